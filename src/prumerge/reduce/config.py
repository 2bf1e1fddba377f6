"""Reducer options as plain data (stdlib only), so the export manifest and the runtime can carry them.

The methods and their options are declared in ``prumerge.reduce.methods`` (one module each) and read through
``prumerge.reduce.registry``; this module turns them into the one config every caller passes around. The defaults are the official LLaVA-PruMerge behaviour: released PruMerge LoRA checkpoints were trained on exactly
that token layout, so every deviation is an explicit, named option and never a silent change.
"""

from __future__ import annotations

import enum
import math

from . import registry
from ..errors import ConfigError


class _MethodBase(str, enum.Enum):
    """Which reduction runs: one member per registered :class:`prumerge.reduce.registry.ReducerSpec` (``NONE`` keeps
    every patch, the unreduced LLaVA baseline). Members are named after the method (``prumerge+`` ->
    ``PRUMERGE_PLUS``)."""

    @property
    def spec(self):
        return registry.get(self.value)

    @property
    def adaptive(self) -> bool:
        """Whether the count depends on the image (and a capacity bounds it)."""
        return self.spec.adaptive

    @classmethod
    def parse(cls, value) -> "Method":
        if isinstance(value, cls):
            return value
        return cls(registry.get(str(value)).name)


Method = _MethodBase("Method", [(name.upper().replace("+", "_PLUS"), name) for name in registry.names()])


class ReducerConfig:
    """Everything that decides which tokens survive and how they are merged: the method, the capacity, and every
    registered method's options (each declared once, in its method's module; a config carries them all, so a manifest
    records one flat, complete set whatever the method).

    ``capacity`` is the static number of output slots of an adaptive method (tokens + extra token + padding); ``None``
    means :func:`default_capacity` for the method and patch count. An image needing more slots keeps its
    highest-attention tokens and is reported as truncated. Fixed-count methods take no capacity: their count is their
    options' (``ReducerSpec.count``).
    """

    __slots__ = ("method", "capacity", "_values")

    def __init__(self, method="prumerge", capacity: int | None = None, **options) -> None:
        known = registry.options()
        unknown = set(options) - set(known)
        if unknown:
            raise ConfigError(f"unknown reducer option(s): {', '.join(sorted(unknown))}")
        values = {name: spec.check(options.get(name, spec.default)) for name, spec in known.items()}
        method = Method.parse(method)
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2):
            raise ConfigError(f"capacity must be an integer >= 2 (one token + the extra token), got {capacity}")
        if capacity is not None and not method.adaptive and method is not Method.NONE:
            raise ConfigError(f"{method.value} outputs a fixed count (see its options); a capacity (--max-tokens) "
                              "applies to prumerge / prumerge+ only")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "capacity", capacity)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str):
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"ReducerConfig has no option {name!r}")

    def __setattr__(self, name, value):
        raise AttributeError("ReducerConfig is immutable: use .replace(...)")

    def __eq__(self, other) -> bool:
        return isinstance(other, ReducerConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.to_dict().items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return f"ReducerConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def __reduce__(self):  # pickling (multiprocessing) goes through the checked constructor
        return (_from_dict, (self.to_dict(),))

    def replace(self, **changes) -> "ReducerConfig":
        return ReducerConfig.from_dict(self.to_dict() | changes)

    @property
    def spec(self):
        return self.method.spec

    @property
    def fixed_count(self) -> int | None:
        """The token count of a fixed-count method (its options'), None for the adaptive ones and ``none``."""
        return None if self.method is Method.NONE else self.spec.fixed_count(self, 0)

    def resolved_capacity(self, num_patches: int) -> int:
        """The capacity used for ``num_patches`` patches, checked against what that grid can hold."""
        if self.fixed_count is not None:
            if self.fixed_count > num_patches:
                raise ConfigError(f"{self.method.value} asks for {self.fixed_count} tokens of a {num_patches}-patch grid; "
                                  f"it can give at most {num_patches}")
            return self.fixed_count
        if self.capacity is None:
            return default_capacity(self.method, num_patches, self.min_keep)
        if self.method is not Method.NONE and self.capacity > num_patches + 1:
            raise ConfigError(
                f"capacity {self.capacity} exceeds {num_patches + 1} (all {num_patches} patches + the extra token)"
            )
        return int(self.capacity)

    def to_dict(self) -> dict:
        return {"method": self.method.value, **{k: _plain(v) for k, v in self._values.items()}, "capacity": self.capacity}

    @classmethod
    def from_dict(cls, data: dict) -> "ReducerConfig":
        return cls(**data)


def _from_dict(data: dict) -> ReducerConfig:
    return ReducerConfig.from_dict(data)


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def max_outliers(num_patches: int) -> int:
    """Most scores that can lie strictly above Q3 (hence above Q3 + f*IQR for f >= 0) among ``num_patches``.

    Q3 sits at sorted position 0.75*(P-1); only the positions after ``floor(0.75*(P-1))`` can exceed it.
    For 576 patches this is 144.
    """
    return num_patches - 1 - math.floor(0.75 * (num_patches - 1))


def default_capacity(method: "Method | str", num_patches: int, min_keep: int = 1) -> int:
    """Smallest capacity that never truncates ``method`` on a ``num_patches`` grid.

    PruMerge keeps at most :func:`max_outliers` patches (or ``min_keep``) plus the extra token; PruMerge+ can in
    the worst case select every patch; ``none`` returns every patch.
    """
    method = Method.parse(method)
    if method is Method.NONE:
        return num_patches
    if method is Method.PRUMERGE:
        return min(num_patches, max(max_outliers(num_patches), min_keep)) + 1
    return num_patches + 1
