"""The reducer as one function with one output contract, shared by PyTorch, ONNX export and every runtime.

Contract (all shapes static, so padded ONNX / TensorRT graphs stay static):
``tokens [B, C, D]``, ``num_tokens [B]`` int64, ``indices [B, C]`` int64, ``truncated [B]`` bool, where ``C`` is the
capacity. Slots below ``num_tokens - 1`` hold merged tokens (``indices`` = source patch), slot ``num_tokens - 1``
holds the extra token (``EXTRA_TOKEN_INDEX``), later slots are zero padding (``PADDING_INDEX``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import InputError
from .attention import importance_scores
from ..artifact.contract import EXTRA_TOKEN_INDEX, PADDING_INDEX
from .config import ReducerConfig
from .merge import merge_weights
from .outliers import iqr_outlier_count
from .ranking import tracing
from .selection import select_tokens


class ReducedTokens(NamedTuple):
    tokens: torch.Tensor
    num_tokens: torch.Tensor
    indices: torch.Tensor
    truncated: torch.Tensor


def check_inputs(features: torch.Tensor, q: torch.Tensor, k: torch.Tensor, prefix: int = 1) -> None:
    """Shape checks always; a finiteness check in eager mode (NaN scores would make the selection arbitrary)."""
    if features.dim() != 3:
        raise InputError(f"features must be [batch, patches, width], got shape {tuple(features.shape)}")
    batch, num_patches, _ = features.shape
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3 or t.shape[0] != batch or t.shape[1] not in ((num_patches + prefix, 1) if name == "q" else (num_patches + prefix,)):
            raise InputError(
                f"{name} must be [batch, {prefix} + patches, width] = [{batch}, {num_patches + prefix}, *] "
                f"(prefix tokens such as CLS first), got shape {tuple(t.shape)}"
            )
    if q.shape[2] != k.shape[2]:
        raise InputError(f"q and k widths differ: {q.shape[2]} vs {k.shape[2]}")
    if num_patches < 2:
        raise InputError(f"the reducer needs at least 2 patches, got {num_patches}")
    if not tracing():
        for name, t in (("features", features), ("q", q), ("k", k)):
            # One float64 sum per tensor: NaN/Inf anywhere make it non-finite, finite float32 values cannot
            # overflow it, and it costs a fraction of an element-wise isfinite().all().
            if not bool(torch.isfinite(t.sum(dtype=torch.float64))):
                raise InputError(f"{name} contains NaN or Inf values; the vision tower produced invalid activations")


def reduce_tokens(
    features: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    config: ReducerConfig = ReducerConfig(),
    num_heads: int = 1,
    prefix: int = 1,
    importance: str = "cls_attention",
) -> ReducedTokens:
    """Run PruMerge / PruMerge+ on ``features [B, P, D]`` with the scoring layer's ``q, k [B, prefix + P, Dk]``.

    ``importance="cls_attention"`` (CLIP, DINOv2: CLS first, ``prefix`` counts CLS and registers) or
    ``"received_attention"`` (towers without CLS, such as SigLIP, ``prefix=0``).
    Computation is float32 whatever the input dtype (fp16 softmax and quantiles would move the outlier
    threshold); tokens come back in the features' dtype.
    """
    if not config.method.adaptive:
        raise InputError(f"reduce_tokens runs 'prumerge' or 'prumerge+', not {config.method.value!r} ('none' keeps all "
                         "patches; visionzip and divprune have their own functions, called by PruMergeEncoder)")
    check_inputs(features, q, k, prefix)
    out_dtype = features.dtype
    features, q, k = features.float(), q.float(), k.float()
    batch, num_patches, width = features.shape
    capacity = config.resolved_capacity(num_patches)

    scores = importance_scores(q, k, config, num_heads, prefix, importance)
    outliers = iqr_outlier_count(scores, config.iqr_factor)
    selection = select_tokens(scores, outliers, config, capacity)
    slots_used = selection.slots
    if not tracing():  # eager: merge only the slots some image uses (the graph keeps its static capacity)
        slots_used = slots_used[:, : max(int(selection.num_selected.max()), 1)]
    weights = merge_weights(k[:, prefix:], scores, slots_used, selection.selected, selection.num_selected, config)
    tokens = torch.matmul(weights, features)  # [B, S + 1, D]: every output token, padding rows zero
    if tokens.shape[1] < capacity:  # eager only: the slots no image used are padding
        tokens = torch.cat([tokens, tokens.new_zeros(batch, capacity - tokens.shape[1], width)], dim=1)

    slot = torch.arange(capacity, device=features.device).unsqueeze(0)
    count = selection.num_selected.unsqueeze(-1)
    slots = selection.slots
    slots = torch.cat([slots, slots.new_full((batch, capacity - slots.shape[1]), PADDING_INDEX)], dim=1)
    indices = torch.where(
        slot < count,
        slots,
        torch.where(slot == count, torch.full_like(slots, EXTRA_TOKEN_INDEX), torch.full_like(slots, PADDING_INDEX)),
    )
    return ReducedTokens(tokens.to(out_dtype), selection.num_selected + 1, indices, selection.truncated)
