"""Fold pruned information into the survivors: key-cosine nearest neighbours and the extra token.

The official code does this with a Python loop over kept tokens, re-concatenating the other tokens each time.
Here the same sums are one GEMM: each slot's neighbours form a ``[B, S, P]`` mask, the weight matrix is the
attention where the mask is set, 1 at the slot's own patch, zero elsewhere, and ``W @ X`` gives every output token
``x_i + sum_j a_j x_j`` at once (the extra token is one more row of the same kind, padding rows are zero), already
in output order. Nothing of size ``[B, S, n, D]`` is ever materialised (the gather it replaced held 75 MB per
image for PruMerge+ at ViT-L width), nor a ``[B, S, D]`` gather of the slots' own features; ``W`` is ``C x P``
floats (1.3 MB per image at 577 x 576, the size of the similarity matrix already there), and the product runs on
tensor cores on a GPU.
"""

from __future__ import annotations

import torch

from .config import ReducerConfig
from .prumerge_options import MergeWeights
from .ranking import top_indices


def _similarity(keys: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Key cosine of each slot's patch to every patch, ``[B, S, P]``; a patch's own entry is -inf.

    When most patches are slots (PruMerge+'s padded capacity) one ``P x P`` Gram matrix and a row gather cost the
    FLOPs of gathering the slots' keys first, without the ``[B, S, D]`` copy of the keys (1.8x the similarity's size
    at ViT-L width); when few are (PruMerge: ``S << P``) the slots' keys are gathered. The scaling by inverse norms
    and the -inf are written in place: no second ``[B, S, P]`` tensor (the graph's planner reuses buffers anyway;
    eager PyTorch needs it said).
    """
    batch, num_slots = slots.shape
    num_patches = keys.shape[1]
    inv_norm = 1.0 / torch.clamp(torch.linalg.vector_norm(keys, dim=-1), min=1e-12)  # [B, P]
    if 2 * num_slots >= num_patches:
        gram = torch.matmul(keys, keys.transpose(1, 2))  # [B, P, P]
        gram.mul_(inv_norm.unsqueeze(-1)).mul_(inv_norm.unsqueeze(1))
        similarity = gram.gather(1, slots.unsqueeze(-1).expand(batch, num_slots, num_patches))
        del gram
    else:
        slot_keys = keys.gather(1, slots.unsqueeze(-1).expand(batch, num_slots, keys.shape[-1]))
        similarity = torch.matmul(slot_keys, keys.transpose(1, 2))  # [B, S, P]
        del slot_keys
        similarity.mul_(inv_norm.gather(1, slots).unsqueeze(-1)).mul_(inv_norm.unsqueeze(1))
    return similarity.scatter_(-1, slots.unsqueeze(-1), float("-inf"))


def neighbor_mask(keys: torch.Tensor, slots: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, S, P]`` bool: each slot's ``count`` most key-cosine-similar other patches, exact ties at the boundary
    going to the lower patch index. Only the set matters for the merge, so no sort: the count-th value from one
    TopK, everything above it, and the first tied ones by a running count (the same rule in every runtime)."""
    similarity = _similarity(keys, slots)
    threshold = torch.topk(similarity, count, dim=-1).values[..., -1:]
    above = similarity > threshold
    tied = similarity == threshold
    dtype = similarity.dtype
    del similarity  # eager: free it before the running count's two [B, S, P] floats
    room = count - above.sum(dim=-1, keepdim=True).to(dtype)
    return above | (tied & (torch.cumsum(tied.to(dtype), dim=-1) <= room))


def nearest_neighbors(keys: torch.Tensor, slots: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` most key-cosine-similar other patches of each slot's patch, ``[B, S, count]``.

    Cosine similarity as raw dot products scaled by inverse norms: the same value as F.normalize'd keys (same eps
    clamp) without dividing the whole [B, P, D] key tensor. A patch is never its own neighbour. Exact ties are
    broken by the lower patch index (:mod:`.ranking`), in eager mode and in the exported graph alike.
    """
    return top_indices(_similarity(keys, slots), count)


def neighbor_gaps(keys: torch.Tensor, indices: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, C]``: for each slot holding a patch (``indices >= 0``), its ``count``-th minus ``(count + 1)``-th
    key-cosine similarity to the other patches; +inf elsewhere and where no (count + 1)-th patch exists."""
    num_patches = keys.shape[1]
    gaps = torch.full(indices.shape, float("inf"), dtype=torch.float64)
    if count <= 0 or count + 1 > num_patches - 1:
        return gaps
    top = torch.topk(_similarity(keys, indices.clamp(min=0)), count + 1, dim=-1).values.double()
    return torch.where(indices >= 0, top[..., count - 1] - top[..., count], gaps)


def merge_weights(
    keys: torch.Tensor,
    scores: torch.Tensor,
    slots: torch.Tensor,
    selected: torch.Tensor,
    num_selected: torch.Tensor,
    config: ReducerConfig,
) -> torch.Tensor:
    """``[B, S + 1, P]``: the output tokens as weights over the original patches, row by output position.

    Row ``r < num_selected``: slot ``r``'s own patch with weight 1 plus its ``neighbors`` most key-cosine-similar
    other patches ``j`` (selected ones included) with weight ``a_j``; row ``num_selected``: ``a_j`` of every patch
    that was not selected (the extra token); later rows zero (padding). ``W @ X`` is then the whole output in one
    GEMM, ``x_i`` included: no ``[B, S, D]`` gather of the slots' own features and no per-row placement of D-wide
    tensors. With ``merge_weights="normalized"`` the own weight is ``a_i`` and each row is divided by its sum.
    """
    batch, num_slots = slots.shape
    num_patches = scores.shape[-1]
    num_neighbors = min(config.neighbors, num_patches - 1)
    normalized = config.merge_weights is MergeWeights.NORMALIZED
    zeros = torch.zeros_like(scores).unsqueeze(1)  # [B, 1, P]
    if num_neighbors > 0:
        mask = neighbor_mask(keys, slots, num_neighbors)  # [B, S, P]; a slot's own patch is never in it
        rows = torch.where(mask, scores.unsqueeze(1), zeros)
        del mask
    else:
        rows = scores.new_zeros(batch, num_slots, num_patches)
    own = scores.gather(-1, slots) if normalized else torch.ones_like(slots, dtype=scores.dtype)
    rows.scatter_(-1, slots.unsqueeze(-1), own.unsqueeze(-1))
    pruned = torch.where(selected, torch.zeros_like(scores), scores).unsqueeze(1)  # [B, 1, P]
    if normalized:
        rows.div_(rows.sum(dim=-1, keepdim=True))
        total = pruned.sum(dim=-1, keepdim=True)
        pruned = pruned / torch.where(total > 0, total, torch.ones_like(total))
    # rows by output position, written in place: slot rows below the count, the extra token's row at the count,
    # zero after it
    weights = torch.cat([rows, zeros], dim=1)  # [B, S + 1, P]
    del rows
    position = torch.arange(num_slots + 1, device=scores.device).view(1, -1, 1)
    count = num_selected.view(-1, 1, 1)
    weights.masked_fill_(position >= count, 0.0)
    return weights.scatter_(1, count.expand(batch, 1, num_patches), pruned)


def merge_tokens(
    features: torch.Tensor,
    keys: torch.Tensor,
    scores: torch.Tensor,
    slots: torch.Tensor,
    selected: torch.Tensor,
    config: ReducerConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(merged [B, S, D], extra [B, 1, D])`` for every slot (all ``S`` treated as holding a token).

    For the patch ``i`` in each slot: its ``neighbors`` most key-cosine-similar other patches ``j`` (selected ones
    included) give ``x_i + sum_j a_j x_j``, all from the original features. ``extra`` is ``sum a_j x_j`` over the
    patches that were not selected. With fewer than ``neighbors + 1`` patches, all other patches are neighbours.
    """
    batch, num_slots = slots.shape
    every_slot = torch.full((batch,), num_slots, dtype=torch.long, device=slots.device)
    sums = torch.matmul(merge_weights(keys, scores, slots, selected, every_slot, config), features)
    return sums[:, :num_slots], sums[:, num_slots:]
