"""Lazy attribute loading for packages whose submodules pull in heavy dependencies (torch, onnx).

``import prumerge`` and ``import prumerge.runtime`` must work on a device without torch, so packages list their
heavy names here and import them on first access.
"""

from __future__ import annotations

from importlib import import_module


def lazy_getattr(package: str, names: dict):
    """A module-level ``__getattr__`` that imports ``names[attr]`` (a module, relative to ``package``) on use."""

    def __getattr__(attr: str):
        if attr in names:
            return getattr(import_module(names[attr], package), attr)
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    return __getattr__
