"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): the max-min diverse subset of the visual tokens under cosine
distance, as the released code (github.com/vbdi/divprune; also ModelTC/llmc's ``token_reduction/divprune.py``)
chooses it, batched and with static shapes.

Official rule, on the tokens the LLM receives (LLaVA: after the projector): distance ``1 - cos`` between every pair;
the first token is the one whose nearest other token is farthest (the second-smallest distance of its column, the
smallest being its own); each next one maximises its minimum distance to those already chosen; ``argmax`` takes the
first index on exact ties. ``keep`` steps, then the chosen tokens in raster order. No text, no attention, no merge.

The ``keep`` greedy steps are unrolled (each an ``ArgMax``, a row ``Gather`` and a ``Min``): the count is static, so
the exported graph needs no ``Loop`` (whose carried state TensorRT 10.3 parses less readily than plain ops).
"""

from __future__ import annotations

import torch

from .ranking import top_indices


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """``[B, P, P]``: ``1 - cos`` between every pair of ``x [B, P, D]`` (the official ``pairwise_cosine_similarity``:
    each row divided by its norm, then one product)."""
    unit = x / torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=1e-12)
    return 1.0 - torch.matmul(unit, unit.transpose(1, 2))


def divprune_tokens(x: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, keep, D], indices [B, keep])``: DivPrune's choice of ``x [B, P, D]`` in raster order."""
    indices = divprune_indices(x, keep)
    return x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1])), indices


def divprune_indices(x: torch.Tensor, keep: int) -> torch.Tensor:
    """``[B, keep]`` chosen token indices of ``x [B, P, D]`` in raster order (computed in float32)."""
    return divprune_choice(x, keep)[0]


def divprune_choice(x: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [B, keep] raster order, closest [B, P])``: the choice and each token's distance to the nearest
    chosen one (what ``inspect`` draws: how well the chosen set covers every token)."""
    distance = cosine_distances(x.float())
    batch, num_tokens = distance.shape[0], distance.shape[1]

    def row(pick: torch.Tensor) -> torch.Tensor:  # [B] -> [B, P]: the picked tokens' distances to every token
        return distance.gather(1, pick.view(batch, 1, 1).expand(batch, 1, num_tokens)).squeeze(1)

    # first pick: the largest second-smallest distance of a column (its own, ~0, is the smallest)
    nearest_other = torch.topk(distance, 2, dim=1, largest=False).values[:, 1, :]  # [B, P]
    pick = torch.argmax(nearest_other, dim=-1)
    chosen = [pick]
    closest = row(pick)  # each token's distance to the chosen set so far
    for _ in range(keep - 1):
        pick = torch.argmax(closest, dim=-1)
        chosen.append(pick)
        closest = torch.minimum(closest, row(pick))
    picks = torch.stack(chosen, dim=-1)  # [B, keep] in the order chosen
    # raster order, sorted as floats (exact below 2**24): TopK on float is what every runtime takes
    return picks.gather(-1, top_indices(picks.to(distance.dtype), keep, largest=False)), closest
