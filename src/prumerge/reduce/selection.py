"""Which patches survive, and in which order they leave the reducer.

Everything is a mask or a sort over the patch axis, so each image keeps its own count with static shapes and no
Python loop (the official code loops and uses Python lists, which neither batches nor exports).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import Method, ReducerConfig
from .prumerge_options import Order
from .ranking import top_indices


class Selection(NamedTuple):
    """Patches chosen for one batch; ``slots`` has ``capacity - 1`` entries, valid below ``num_selected``."""

    slots: torch.Tensor  # [B, S] int64 patch index per output slot
    num_selected: torch.Tensor  # [B] int64
    selected: torch.Tensor  # [B, P] bool
    truncated: torch.Tensor  # [B] bool: the image wanted more than capacity - 1 tokens


def plus_stride(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """PruMerge+ sampling stride per image: ``int(int(P / k) / 3)``, at least 1.

    The official code computes ``int(1 / (k / P))`` in floating point and crashes (``arange`` step 0) when the
    stride is 0; integer division is exact and the stride is clamped to 1 (sample every patch).
    """
    # Float division and floor are exact here (integers far below 2**24) and keep int64 math out of the graph.
    step = torch.floor(num_patches / keep.to(torch.float32))
    return torch.clamp(torch.floor(step / 3), min=1).to(torch.int64)


def select_tokens(scores: torch.Tensor, outliers: torch.Tensor, config: ReducerConfig, capacity: int) -> Selection:
    """Keep the top-``k`` patches by attention (``k`` = outlier count, at least ``min_keep``) and, for PruMerge+,
    the raster samples ``0, s, 2s, ... < P - 1`` that are not already kept."""
    batch, num_patches = scores.shape
    device = scores.device
    order = top_indices(scores, num_patches)  # descending attention, ties by lower patch index
    positions = torch.arange(num_patches, device=device)
    rank = torch.empty_like(order).scatter_(-1, order, positions.expand(batch, -1))

    keep = torch.clamp(outliers, min=config.min_keep, max=num_patches)
    kept = rank < keep.unsqueeze(-1)
    if config.method is Method.PRUMERGE_PLUS:
        stride = plus_stride(keep, num_patches).unsqueeze(-1).to(scores.dtype)
        pos = positions.to(scores.dtype)
        on_grid = torch.floor(pos / stride) * stride == pos  # float arithmetic: exact here, TensorRT-friendly
        sampled = on_grid & (positions < num_patches - 1) & ~kept
    else:
        sampled = torch.zeros_like(kept)
    wanted = kept | sampled

    # Capacity: the (capacity - 1) highest-attention wanted patches survive; kept ones outrank every sample.
    limit = capacity - 1
    wanted_by_rank = wanted.gather(-1, order)
    running = torch.cumsum(wanted_by_rank.to(scores.dtype), dim=-1)
    survive_by_rank = wanted_by_rank & (running <= limit)
    selected = torch.zeros_like(wanted).scatter_(-1, order, survive_by_rank)
    truncated = wanted.sum(dim=-1) > limit
    num_selected = selected.sum(dim=-1)

    # One sort key per patch puts selected patches first, in the configured order.
    pos = positions.to(scores.dtype).expand(batch, -1)
    big = float(num_patches)
    if config.order is Order.OFFICIAL:
        key = torch.where(selected & kept, rank.to(scores.dtype), torch.where(selected, big + pos, 2 * big + pos))
    else:
        key = torch.where(selected, pos, big + pos)
    slots = top_indices(key, min(limit, num_patches), largest=False)
    return Selection(slots=slots, num_selected=num_selected, selected=selected, truncated=truncated)
