"""Adaptive token budget: how many patch scores are IQR outliers, per image.

The official code pools the whole batch into one numpy array (so at batch > 1 every image gets the batch's
count); here each image gets its own count, computed with sort + fixed-index interpolation so the graph stays
static and exports to ONNX (``torch.quantile`` does not export everywhere).
"""

from __future__ import annotations

import math

import torch


def linear_quantile(sorted_scores: torch.Tensor, q: float) -> torch.Tensor:
    """``q``-quantile of ascending ``[B, P]`` scores with numpy's default 'linear' method, shape ``[B]``.

    The position ``q*(P-1)`` is known at trace time, so this is two static gathers and a lerp written the way
    numpy writes it (interpolating from the nearer end), which keeps results bit-close to ``np.percentile``.
    """
    n = sorted_scores.shape[-1]
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    t = pos - lo
    a = sorted_scores[..., lo]
    b = sorted_scores[..., hi]
    if t >= 0.5:
        return b - (b - a) * (1.0 - t)
    return a + (b - a) * t


def iqr_threshold(scores: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    """``Q3 + factor * IQR`` of each row of ``[B, P]``; ``[B]``."""
    # topk with a static K (not sort): exports as TopK whose K is a constant, as TensorRT's parser requires.
    ordered = torch.topk(scores, scores.shape[-1], dim=-1, largest=False, sorted=True).values
    q1 = linear_quantile(ordered, 0.25)
    q3 = linear_quantile(ordered, 0.75)
    return q3 + factor * (q3 - q1)


def iqr_outlier_count(scores: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    """Number of scores strictly above ``Q3 + factor * IQR`` for each row of ``[B, P]``; int64 ``[B]``."""
    return (scores > iqr_threshold(scores, factor).unsqueeze(-1)).sum(dim=-1)
