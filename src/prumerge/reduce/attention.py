"""CLS -> patch importance from the last encoder layer's queries and keys.

Only the CLS row of the attention matrix is computed: softmax is row-wise, so this equals the official code's
full 577x577 matrix sliced at row 0, at 1/577 of the cost.
"""

from __future__ import annotations

import torch

from .config import Attention


def cls_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int = 1, mode: Attention = Attention.OFFICIAL) -> torch.Tensor:
    """Attention of the CLS query to every patch key, shape ``[B, P]``.

    ``q`` and ``k`` are ``[B, 1 + P, D]`` outputs of ``q_proj``/``k_proj`` (bias included, before any scaling),
    CLS first. The softmax runs over all ``1 + P`` keys (CLS included) and is not renormalised over patches,
    as in the official code.
    """
    batch, tokens, width = q.shape
    if Attention(mode) is Attention.OFFICIAL:
        logits = torch.matmul(q[:, :1], k.transpose(1, 2)) * (width**-0.5)  # [B, 1, N]
        return torch.softmax(logits, dim=-1)[:, 0, 1:]
    head_dim = width // num_heads
    qh = q[:, :1].reshape(batch, 1, num_heads, head_dim).transpose(1, 2)  # [B, H, 1, d]
    kh = k.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)  # [B, H, N, d]
    probs = torch.softmax(torch.matmul(qh, kh.transpose(2, 3)) * (head_dim**-0.5), dim=-1)  # [B, H, 1, N]
    return probs.mean(dim=1)[:, 0, 1:]
