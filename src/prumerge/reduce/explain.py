"""What the reducer decided for one image, in plain Python values: for pictures, reports and tests.

Uses the same functions as the reducers (PruMerge: attention, outlier count, selection, neighbour search;
VisionZip: its plan; DivPrune: its choice; each method's ``explain`` in its registry spec), so what is drawn is what
the reducer did.
"""

from __future__ import annotations

import dataclasses

import torch

from .attention import importance_scores
from .config import ReducerConfig
from .merge import nearest_neighbors
from .outliers import iqr_outlier_count
from .ranking import top_indices
from .selection import select_tokens


@dataclasses.dataclass
class Explanation:
    scores: list  # per patch (raster order): CLS attention (VisionZip: summed over heads); DivPrune: cosine distance
    #               to the nearest chosen token
    outliers: int  # IQR outlier count before min_keep / capacity (fixed-count methods: the patches kept)
    kept: list  # patches kept by attention (descending; VisionZip's dominant in raster order; DivPrune's picks)
    sampled: list  # PruMerge+ raster samples / VisionZip's contextual targets, in output order
    neighbors: dict  # selected patch -> the patches merged into it
    pruned_only_in_extra: list  # patches no selected token took as a neighbour (PruMerge: only in the extra token;
    #                             DivPrune: dropped)
    truncated: bool


def explain(features: torch.Tensor, q: torch.Tensor, k: torch.Tensor, config: ReducerConfig, num_heads: int = 1,
            prefix: int = 1, importance: str = "cls_attention", **inputs) -> Explanation:
    """Batch-1 ``features [1, P, D]`` (the tokens the method chooses among: projected for a ``projected`` method),
    ``q/k [1, prefix + P, D]`` -> :class:`Explanation` (prefix and importance as the tower's adapter gives them, so
    what is drawn is scored as the exported graph scores it). Each method's own ``explain`` (its registry spec)."""
    if config.spec.explain is None:
        raise ValueError("explain needs a reducing method")
    return config.spec.explain(features.float(), q.float(), k.float(), config, num_heads, prefix, importance, **inputs)


def explain_prumerge(features: torch.Tensor, q: torch.Tensor, k: torch.Tensor, config: ReducerConfig, num_heads: int,
                     prefix: int, importance: str) -> Explanation:
    """PruMerge / PruMerge+: the attention, outlier count, selection and neighbour search of the reducer itself."""
    num_patches = features.shape[1]
    scores = importance_scores(q, k, config, num_heads, prefix, importance)
    outliers = iqr_outlier_count(scores, config.iqr_factor)
    selection = select_tokens(scores, outliers, config, config.resolved_capacity(num_patches))
    count = int(selection.num_selected[0])
    slots = selection.slots[:, :count]
    keep = max(min(int(outliers[0]), num_patches), config.min_keep)
    rank_order = top_indices(scores[0], num_patches).tolist()
    top = set(rank_order[:keep])
    order = slots[0].tolist()
    neighbors = {}
    n = min(config.neighbors, num_patches - 1)
    if n > 0 and count:
        found = nearest_neighbors(k[:, prefix:], slots, n)[0].tolist()
        neighbors = {patch: found[i] for i, patch in enumerate(order)}
    merged = set().union(*neighbors.values()) if neighbors else set()
    selected = set(order)
    return Explanation(
        scores=scores[0].tolist(),
        outliers=int(outliers[0]),
        kept=[p for p in order if p in top],
        sampled=[p for p in order if p not in top],
        neighbors=neighbors,
        pruned_only_in_extra=sorted(set(range(num_patches)) - selected - merged),
        truncated=bool(selection.truncated[0]),
    )
