"""Build side: vision tower + reducer (+ projector) -> ONNX, graph checks, artifact directory with manifest.

Submodules import torch/onnx on use; importing ``prumerge.export`` itself is cheap.
"""

from importlib import import_module

_LAZY = {
    "BuildOptions": ".build",
    "build_artifact": ".build",
    "verify_artifact": ".verify",
    "inspect_artifact": ".verify",
    "export_onnx": ".graph",
    "Contract": ".graph",
    "VisionGraph": ".graph",
    "op_support": ".checks",
    "check_onnx": ".checks",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
