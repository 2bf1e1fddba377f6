"""CLS -> patch importance from the last encoder layer's queries and keys.

Only the CLS row of the attention matrix is computed: softmax is row-wise, so this equals the official code's
full 577x577 matrix sliced at row 0, at 1/577 of the cost.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .prumerge_options import Attention


def cls_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int = 1, mode: Attention = Attention.OFFICIAL,
                  prefix: int = 1) -> torch.Tensor:
    """Attention of the CLS query to every patch key, shape ``[B, P]``.

    ``q`` and ``k`` are outputs of ``q_proj``/``k_proj`` (bias included, before any scaling), CLS first, then any
    register tokens: ``k`` is ``[B, prefix + P, D]``; ``q`` only needs its CLS row (``[B, 1, D]``, what the
    encoder computes) but may hold every row. The softmax runs over all keys (CLS and registers included) and is
    not renormalised over patches, as in the official code.
    """
    width = k.shape[-1]
    if Attention(mode) is Attention.OFFICIAL:
        logits = torch.matmul(q[:, :1], k.transpose(1, 2)) * (width**-0.5)  # [B, 1, N]
        return torch.softmax(logits, dim=-1)[:, 0, prefix:]
    return cls_head_probs(q, k, num_heads).mean(dim=1)[:, prefix:]


def cls_head_probs(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, H, N]``: the CLS query's attention over every key in each of the model's heads,
    ``softmax(q_h k_h^T / sqrt(head_dim))`` (PruMerge's ``per_head`` averages it; VisionZip sums it)."""
    batch, tokens, width = k.shape
    head_dim = width // num_heads
    qh = q[:, :1].reshape(batch, 1, num_heads, head_dim).transpose(1, 2)  # [B, H, 1, d]
    kh = k.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)  # [B, H, N, d]
    return torch.softmax(torch.matmul(qh, kh.transpose(2, 3)) * (head_dim**-0.5), dim=-1)[:, :, 0]


def importance_scores(q: torch.Tensor, k: torch.Tensor, config, num_heads: int, prefix: int,
                      importance: str = "cls_attention") -> torch.Tensor:
    """Patch importance ``[B, P]`` as the tower's adapter names it: ``cls_attention`` (CLIP, DINOv2) or
    ``received_attention`` (towers without CLS, such as SigLIP, which needs every query row)."""
    if importance == "received_attention":
        if q.shape[1] != k.shape[1]:
            raise InputError("received attention needs every query row: q must be [batch, prefix + patches, width]")
        return received_attention(q, k, num_heads=num_heads, prefix=prefix)
    return cls_attention(q, k, num_heads=num_heads, mode=config.attention, prefix=prefix)


def received_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int, prefix: int = 0) -> torch.Tensor:
    """Attention each patch receives, averaged over all queries and heads, ``[B, P]`` (towers without CLS).

    The model's own heads are used (``softmax(q_h k_h^T / sqrt(head_dim))``); this is the importance published
    PruMerge+ ports use for SigLIP, a deviation from the paper's CLS attention.
    """
    batch, tokens, width = q.shape
    head_dim = width // num_heads
    qh = q.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)
    kh = k.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)
    probs = torch.softmax(torch.matmul(qh, kh.transpose(2, 3)) * (head_dim**-0.5), dim=-1)  # [B, H, N, N]
    return probs.mean(dim=(1, 2))[:, prefix:]
