"""Reducer options as plain data (stdlib only), so the export manifest and the runtime can carry them.

The defaults are the official LLaVA-PruMerge behaviour: released PruMerge LoRA checkpoints were trained on exactly
that token layout, so every deviation is an explicit, named option and never a silent change.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from ..errors import ConfigError


class Method(str, enum.Enum):
    """Which reduction runs. ``NONE`` keeps every patch (the unreduced LLaVA baseline). PruMerge and PruMerge+ keep
    an adaptive count per image; VisionZip and DivPrune a fixed one (``dominant_tokens + contextual_tokens``,
    ``diverse_tokens``)."""

    NONE = "none"
    PRUMERGE = "prumerge"
    PRUMERGE_PLUS = "prumerge+"
    VISIONZIP = "visionzip"
    DIVPRUNE = "divprune"

    @property
    def adaptive(self) -> bool:
        """Whether the count depends on the image (and a capacity bounds it)."""
        return self in (Method.PRUMERGE, Method.PRUMERGE_PLUS)

    @classmethod
    def parse(cls, value: "str | Method") -> "Method":
        if isinstance(value, Method):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown method {value!r}; choose one of: {names}") from None


class Attention(str, enum.Enum):
    """How CLS->patch importance is read from the last layer's q/k.

    ``OFFICIAL``: one full-width head, ``softmax(q k^T / sqrt(hidden))`` (what the official code computes).
    ``PER_HEAD``: the model's real heads, ``softmax(q_h k_h^T / sqrt(head_dim))`` averaged over heads.
    """

    OFFICIAL = "official"
    PER_HEAD = "per_head"


class Order(str, enum.Enum):
    """Order of the kept tokens in the output.

    ``OFFICIAL``: kept tokens by descending attention, then (PruMerge+) the sampled tokens in raster order.
    ``SPATIAL``: all selected tokens in raster (patch index) order.
    The extra token is always last.
    """

    OFFICIAL = "official"
    SPATIAL = "spatial"


class MergeWeights(str, enum.Enum):
    """How neighbours are folded into a kept token.

    ``OFFICIAL``: ``x_i + sum_j a_j x_j`` with raw CLS attention ``a_j`` (the official residual formula).
    ``NORMALIZED``: the attention-weighted mean ``(a_i x_i + sum_j a_j x_j) / (a_i + sum_j a_j)``, which keeps the
    feature scale of the tower; the extra token likewise becomes a weighted mean of the pruned patches.
    """

    OFFICIAL = "official"
    NORMALIZED = "normalized"


@dataclasses.dataclass(frozen=True)
class ReducerConfig:
    """Everything that decides which tokens survive and how they are merged.

    ``min_keep`` is prumerge's answer to the official code's zero-outlier case (which yields no kept token for
    PruMerge and divides by zero for PruMerge+): when fewer than ``min_keep`` scores are outliers, the
    ``min_keep`` highest-attention patches are kept instead.
    ``capacity`` is the static number of output slots (tokens + extra token + padding); ``None`` means
    :func:`default_capacity` for the method and patch count. An image needing more slots keeps its
    highest-attention tokens and is reported as truncated. Fixed-count methods take no capacity: their count is
    ``dominant_tokens + contextual_tokens`` (VisionZip; its defaults are the official 64-token setting, CLS counted
    among the dominant) or ``diverse_tokens`` (DivPrune).
    """

    method: Method = Method.PRUMERGE
    attention: Attention = Attention.OFFICIAL
    order: Order = Order.OFFICIAL
    merge_weights: MergeWeights = MergeWeights.OFFICIAL
    iqr_factor: float = 1.5
    neighbors: int = 32
    min_keep: int = 1
    capacity: int | None = None
    dominant_tokens: int = 54
    contextual_tokens: int = 10
    diverse_tokens: int = 64

    def __post_init__(self) -> None:
        # Normalise strings to enums so configs built from JSON or CLI options compare equal.
        object.__setattr__(self, "method", Method.parse(self.method))
        for name, kind in (("attention", Attention), ("order", Order), ("merge_weights", MergeWeights)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                names = ", ".join(m.value for m in kind)
                raise ConfigError(f"unknown {name} {value!r}; choose one of: {names}") from None
        if not math.isfinite(self.iqr_factor) or self.iqr_factor < 0:
            raise ConfigError(f"iqr_factor must be a finite number >= 0, got {self.iqr_factor}")
        if int(self.neighbors) != self.neighbors or self.neighbors < 0:
            raise ConfigError(f"neighbors must be an integer >= 0, got {self.neighbors}")
        if int(self.min_keep) != self.min_keep or self.min_keep < 1:
            raise ConfigError(f"min_keep must be an integer >= 1, got {self.min_keep}")
        if self.capacity is not None and (int(self.capacity) != self.capacity or self.capacity < 2):
            raise ConfigError(f"capacity must be an integer >= 2 (one token + the extra token), got {self.capacity}")
        for name, least in (("dominant_tokens", 2), ("contextual_tokens", 1), ("diverse_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value}")
        if self.capacity is not None and not self.method.adaptive and self.method is not Method.NONE:
            raise ConfigError(f"{self.method.value} outputs a fixed count (see dominant_tokens, contextual_tokens, "
                              "diverse_tokens); a capacity (--max-tokens) applies to prumerge / prumerge+ only")

    @property
    def fixed_count(self) -> int | None:
        """The token count of a fixed-count method, None for the adaptive ones and ``none``."""
        if self.method is Method.VISIONZIP:
            return self.dominant_tokens + self.contextual_tokens
        if self.method is Method.DIVPRUNE:
            return self.diverse_tokens
        return None

    def resolved_capacity(self, num_patches: int) -> int:
        """The capacity used for ``num_patches`` patches, checked against what that grid can hold."""
        if self.fixed_count is not None:
            # at most every patch (VisionZip: CLS + dominant + at least one patch per contextual target)
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
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "ReducerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown reducer option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


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
