"""VisionZip (Yang et al., arXiv 2412.04467): dominant tokens by CLS attention, the rest merged into contextual
tokens, as the released code (github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py`` and ``utils.py``)
computes them, batched and with static shapes.

The official code reads everything from one layer, the one whose output LLaVA takes as features (``layers[-2]``
for LLaVA-1.5): that layer's attention of the CLS query to the patches, **summed over the model's heads**, picks
the dominant patches (top ``dominant - 1``; CLS itself is always the first dominant token); the same layer's keys,
**averaged over heads** and L2-normalised, are the similarity metric for the rest. Of the remaining patches (raster
order) ``contextual`` targets are taken at a uniform stride ``max(1, R // contextual)``; every other remaining patch
joins its most key-cosine-similar target (``argmax``: the first on exact ties), and a contextual token is
``x_target + mean(x_joined)`` (the mean over at least 1). Output order as the official concatenation: CLS, the
dominant patches in raster order, then the contextual tokens in target order. Fixed count: no extra token, no
padding.

Towers without CLS (SigLIP) score by attention received (the paper's fallback) and have no CLS token to keep; a
tower's register tokens are neither dominant nor merged (the official code has none).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..artifact.contract import CLS_TOKEN_INDEX, CONTEXTUAL_TOKEN_INDEX
from .attention import cls_head_probs, received_attention
from .ranking import top_indices


def head_mean_keys(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, d]``: keys averaged over heads (VisionZip's ``metric``, ``raw_key_states.mean(1)``)."""
    batch, tokens, width = k.shape
    return k.reshape(batch, tokens, num_heads, width // num_heads).mean(dim=2)


def target_positions(remaining: int, contextual: int) -> tuple[list, list]:
    """Positions, within the remaining patches, of the contextual targets and of the patches merged into them."""
    step = max(1, remaining // contextual)
    targets = list(range(0, remaining, step))[:contextual]
    chosen = set(targets)
    return targets, [i for i in range(remaining) if i not in chosen]


class Plan(NamedTuple):
    """What VisionZip decided for a batch (patch indices; ``assign`` the target each merged patch joined)."""

    scores: torch.Tensor  # [B, P] the attention dominant tokens are chosen by
    with_cls: bool  # a CLS token leads the output
    dominant: torch.Tensor  # [B, n] dominant patches, raster order
    targets: torch.Tensor  # [B, m] contextual targets, in output order
    merged: torch.Tensor  # [B, R - m] the other remaining patches, raster order
    assign: torch.Tensor  # [B, R - m] which target (0..m-1) each merged patch joins


def visionzip_plan(q: torch.Tensor, k: torch.Tensor, num_patches: int, dominant: int, contextual: int, num_heads: int,
                   prefix: int, importance: str = "cls_attention") -> Plan:
    """The choices of :func:`visionzip_tokens` from the scoring layer's ``q, k`` alone."""
    batch, device = k.shape[0], k.device
    with_cls = prefix > 0 and importance == "cls_attention"
    if with_cls:
        scores = cls_head_probs(q, k, num_heads).sum(dim=1)[:, prefix:]  # attn_weights[:, :, 0, 1:].sum(dim=1)
    else:
        scores = received_attention(q, k, num_heads=num_heads, prefix=prefix)
    chosen = dominant - 1 if with_cls else dominant
    top = top_indices(scores, chosen)  # [B, chosen]
    positions = torch.arange(num_patches, device=device)
    is_dominant = torch.zeros(batch, num_patches, dtype=torch.bool, device=device).scatter_(-1, top, True)
    order_key = torch.where(is_dominant, positions - num_patches, positions).to(scores.dtype)  # dominant first
    raster = top_indices(order_key, num_patches, largest=False)  # dominant in raster order, then the rest
    remaining = raster[:, chosen:]
    targets, others = target_positions(num_patches - chosen, contextual)
    target_idx, other_idx = remaining[:, targets], remaining[:, others]
    metric = head_mean_keys(k, num_heads)[:, prefix:]
    metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True)
    width = metric.shape[-1]
    target_metric = metric.gather(1, target_idx.unsqueeze(-1).expand(-1, -1, width))
    other_metric = metric.gather(1, other_idx.unsqueeze(-1).expand(-1, -1, width))
    similarity = torch.matmul(other_metric, target_metric.transpose(1, 2))  # [B, R - m, m]
    assign = torch.argmax(similarity, dim=-1)  # first on exact ties, as torch.argmax and ONNX ArgMax both define
    return Plan(scores, with_cls, raster[:, :chosen], target_idx, other_idx, assign)


def visionzip_tokens(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, dominant: int, contextual: int,
                     num_heads: int, prefix: int, importance: str = "cls_attention"):
    """VisionZip on ``hidden [B, prefix + P, D]`` (the feature layer, prefix tokens first) with that layer's
    ``q`` (CLS row at least) and ``k [B, prefix + P, Dk]``; returns ``(tokens [B, C, D], indices [B, C])`` with
    ``C = dominant + contextual``: CLS as ``CLS_TOKEN_INDEX``, dominant patches by index, contextual tokens as
    ``CONTEXTUAL_TOKEN_INDEX``."""
    patches = hidden[:, prefix:]
    plan = visionzip_plan(q, k, patches.shape[1], dominant, contextual, num_heads, prefix, importance)
    depth = patches.shape[-1]

    def rows(index: torch.Tensor) -> torch.Tensor:
        return patches.gather(1, index.unsqueeze(-1).expand(-1, -1, depth))

    targets = plan.targets.shape[1]
    one_hot = (plan.assign.unsqueeze(-1) == torch.arange(targets, device=hidden.device)).to(patches.dtype)
    counts = torch.clamp(one_hot.sum(dim=1), min=1.0).unsqueeze(-1)  # [B, m, 1]
    contextual_x = rows(plan.targets) + torch.matmul(one_hot.transpose(1, 2), rows(plan.merged)) / counts
    parts = [rows(plan.dominant), contextual_x]
    index_parts = [plan.dominant, torch.full_like(plan.targets, CONTEXTUAL_TOKEN_INDEX)]
    if plan.with_cls:
        parts.insert(0, hidden[:, :1])
        index_parts.insert(0, torch.full_like(plan.targets[:, :1], CLS_TOKEN_INDEX))
    return torch.cat(parts, dim=1), torch.cat(index_parts, dim=1)
