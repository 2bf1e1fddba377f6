"""Fold pruned information into the survivors: key-cosine nearest neighbours and the extra token.

The official code does this with a Python loop over kept tokens, re-concatenating the other tokens each time;
here one batched similarity matrix, one top-k and one sparse-weight matmul do the same sum for every slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import MergeWeights, ReducerConfig


def merge_tokens(
    features: torch.Tensor,
    keys: torch.Tensor,
    scores: torch.Tensor,
    slots: torch.Tensor,
    selected: torch.Tensor,
    config: ReducerConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(merged [B, S, D], extra [B, 1, D])``.

    For the patch ``i`` in each slot: its ``neighbors`` most key-cosine-similar other patches ``j`` (selected ones
    included) give ``x_i + sum_j a_j x_j``, all from the original features. ``extra`` is ``sum a_j x_j`` over the
    patches that were not selected. With fewer than ``neighbors + 1`` patches, all other patches are neighbours.
    """
    batch, num_patches, width = features.shape
    num_slots = slots.shape[1]
    unit_keys = F.normalize(keys, p=2, dim=-1)
    gather_index = slots.unsqueeze(-1).expand(batch, num_slots, width)
    slot_keys = unit_keys.gather(1, gather_index)
    slot_features = features.gather(1, gather_index)

    similarity = torch.matmul(slot_keys, unit_keys.transpose(1, 2))  # [B, S, P]
    similarity = similarity.scatter(-1, slots.unsqueeze(-1), float("-inf"))  # a patch is not its own neighbour
    num_neighbors = min(config.neighbors, num_patches - 1)
    slot_scores = scores.unsqueeze(1).expand(batch, num_slots, num_patches)
    weights = torch.zeros_like(similarity)
    if num_neighbors > 0:
        neighbors = torch.topk(similarity, num_neighbors, dim=-1).indices
        weights = weights.scatter(-1, neighbors, slot_scores.gather(-1, neighbors))
    neighbor_sum = torch.matmul(weights, features)
    merged = slot_features + neighbor_sum

    pruned_weights = torch.where(selected, torch.zeros_like(scores), scores).unsqueeze(1)  # [B, 1, P]
    extra = torch.matmul(pruned_weights, features)
    if config.merge_weights is MergeWeights.NORMALIZED:
        own = scores.gather(-1, slots).unsqueeze(-1)
        merged = (own * slot_features + neighbor_sum) / (own + weights.sum(-1, keepdim=True))
        total = pruned_weights.sum(-1, keepdim=True)
        extra = extra / torch.where(total > 0, total, torch.ones_like(total))
    return merged, extra
