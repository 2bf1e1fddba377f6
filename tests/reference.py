"""A plain, loop-based PruMerge written from the description of the official code (batch 1).

It deliberately looks like the official implementation (full attention matrix, numpy percentiles, a Python loop
over kept tokens that re-concatenates "the rest" each time) so the vectorised reducer is checked against an
independent formulation, not against itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def reference_prumerge(features, q, k, plus=False, iqr_factor=1.5, neighbors=32, min_keep=1, scores=None, normalized=False):
    """features [P, D], q/k [1 + P, D] -> (tokens [n + 1, D], kept patch indices in output order).

    ``scores`` replaces the CLS attention (towers without CLS); ``k`` then holds only patch keys' rows after a
    prefix of ``len(k) - P`` tokens. ``normalized``: attention-weighted means (the kept token weighted by its own
    attention) instead of the official residual sums."""
    num_patches, width = features.shape
    if scores is None:
        attn = torch.softmax((q @ k.T) * q.shape[-1] ** -0.5, dim=-1)
        cls_attn = attn[0, 1:]
    else:
        cls_attn = scores
    scores = cls_attn.to(torch.float32).numpy()
    q1, q3 = np.percentile(scores, 25), np.percentile(scores, 75)
    upper = q3 + iqr_factor * (q3 - q1)
    keep = max(int(np.sum(scores > upper)), min_keep)
    idx = torch.topk(cls_attn, keep).indices.tolist()
    if plus:
        stride = max(1, (num_patches // keep) // 3)
        idx = idx + [x for x in range(0, num_patches - 1, stride) if x not in idx]
    complement = sorted(set(range(num_patches)) - set(idx))
    unit_keys = F.normalize(k[len(k) - num_patches:], p=2, dim=-1)
    out = []
    for i, p in enumerate(idx):
        rest = idx[:i] + idx[i + 1:] + complement
        sims = unit_keys[rest] @ unit_keys[p]
        top = torch.topk(sims, min(neighbors, num_patches - 1)).indices.tolist() if neighbors > 0 else []
        merged = (cls_attn[p] if normalized else 1.0) * features[p].clone()
        total = cls_attn[p] if normalized else 1.0
        for t in top:
            merged = merged + cls_attn[rest[t]] * features[rest[t]]
            if normalized:
                total = total + cls_attn[rest[t]]
        out.append(merged / total)
    extra = torch.zeros(width)
    total = 0.0
    for j in complement:
        extra = extra + cls_attn[j] * features[j]
        total = total + cls_attn[j]
    if normalized and complement:
        extra = extra / total
    return torch.stack(out + [extra]), idx


def peaked_inputs(seed, num_patches=64, width=32, peaks=None, batch=1, spread=1.0):
    """Random q/k/features whose CLS attention has a few strong peaks, like a trained CLIP's.

    ``peaks`` patches get keys aligned with the CLS query, so they become IQR outliers; the count varies with
    the seed, which is what exercises the adaptive budget.
    """
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, num_patches, width, generator=g)
    q = torch.randn(batch, num_patches + 1, width, generator=g) * spread
    k = torch.randn(batch, num_patches + 1, width, generator=g) * spread
    for b in range(batch):
        n = peaks if peaks is not None else int(torch.randint(1, max(2, num_patches // 6), (1,), generator=g))
        chosen = torch.randperm(num_patches, generator=g)[:n] + 1
        strength = 1.0 + 3.0 * torch.rand(n, 1, generator=g)
        k[b, chosen] += strength * q[b, 0] / q[b, 0].norm() * width**0.5
    return features, q, k
