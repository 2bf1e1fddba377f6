"""PruMerge's and PruMerge+'s options, declared once: the option types the torch code branches on and the dataclass
the reducer registry reads (flags, help, ranges). A leaf module (stdlib only), so both ``reduce.methods.prumerge`` and
the torch modules it calls import it without a cycle."""

from __future__ import annotations

import dataclasses
import enum

from .registry import option


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
class PruMergeOptions:
    """``min_keep`` is prumerge's answer to the official code's zero-outlier case (which yields no kept token for
    PruMerge and divides by zero for PruMerge+): when fewer than ``min_keep`` scores are outliers, the ``min_keep``
    highest-attention patches are kept instead."""

    attention: Attention = option(Attention.OFFICIAL, "prumerge: CLS attention as one full-width head (official) or "
                                  "averaged over the model's heads")
    order: Order = option(Order.OFFICIAL, "prumerge: kept tokens by descending attention (official) or in raster order")
    merge_weights: MergeWeights = option(MergeWeights.OFFICIAL, "prumerge: x_i + sum a_j x_j (official) or the "
                                         "attention-weighted mean")
    iqr_factor: float = option(1.5, "prumerge: keep scores above Q3 + f * IQR", minimum=0)
    neighbors: int = option(32, "prumerge: patches merged into each kept token", minimum=0)
    min_keep: int = option(1, "prumerge: fewest tokens kept when too few scores are outliers", minimum=1)
