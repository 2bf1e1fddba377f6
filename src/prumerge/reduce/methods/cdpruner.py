"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967): the question decides what is kept. The visual tokens
form a conditional determinantal point process whose kernel is ``r_i * S_ij * r_j``: ``S`` the cosine similarity of
the projected tokens (diversity), ``r`` each token's relevance to the instruction (quality); the kept set is the
DPP's fast greedy MAP (Chen et al. 2018), ``kept_tokens`` steps, then sorted to raster order.

Released rule (github.com/Theia-4869/CDPruner, ``llava/model/llava_arch.py`` ``encode_images``): ``relevance`` is the
cosine between image and text embeddings, **negated**, averaged over the text's rows, then min-max normalised
(``(r - min + 1e-6) / (max - min)``); each greedy step takes the argmax of the remaining diagonal ``di2s``, writes the
row ``e = (K[j] - sum_t c_t[j] c_t) / sqrt(di2s[j])``, subtracts ``e**2`` from ``di2s`` and sets ``di2s[j] = -inf``.

Here, decided and recorded (options, so a manifest says which):

* **What the relevance reads.** The released code compares CLIP image embeddings with CLIP text embeddings of the
  instruction (a full CLIP checkpoint). Towers without a CLIP text side (the demo's DINOv2-S; SigLIP-only LLaVA
  checkpoints) have none, so the graph takes the instruction's rows in the LLM's own input-embedding space
  (``question_embeds [B, S, D]`` with ``question_mask [B, S]``, the runtime embeds the question with the decoder's
  table) and compares them with the projected tokens, which LLaVA's projector trains into that space. Only this
  source is built so far; the CLIP-text source is the released one for CLIP towers.
* **Min-max scope** (``relevance_scope``): the released code takes min and max over the whole batch, so an image's
  selection depends on the other images batched with it; ``image`` (default) takes them per image: identical at
  batch 1 (how the released code evaluates), independent of batching otherwise. ``batch`` is the released form.
* **Sign** (``relevance_sign``, default ``positive``): the released code negates the CLIP cosine (a fix for CLIP's
  patch embeddings, whose similarity to the text runs opposite to their relevance); in the LLM's embedding space the
  projector was trained to point a patch's token *towards* its words, and on the demo VLM's 280 held-out-wording
  questions at 34 tokens (``bench/bench_cdpruner.py --signs positive,negated``, ``docs/evaluate-cdpruner.json``)
  positive answered 0.761, negated 0.643 (DivPrune 0.768). ``negated`` stays an option: the released rule, for a
  CLIP-text relevance.
* **Exhausted kernels.** When every remaining diagonal entry is <= 0 (more steps than the kernel's rank) the released
  code takes the square root of a non-positive number (NaN, then an arbitrary choice); here the divisor is clamped to
  a tiny positive value, so such steps still pick distinct tokens in a defined order. Identical otherwise.

The ``kept_tokens`` greedy steps are unrolled (each an ArgMax, a row Gather, a weighted sum of the rows so far): the
count is static, so the graph needs no ``Loop``. torch is imported inside the functions (the registry is read
without it).
"""

from __future__ import annotations

import dataclasses
import enum

from ...artifact.contract import QUESTION_INPUTS  # the graph inputs this method adds
from ..registry import ReducerSpec, option, register


class RelevanceScope(str, enum.Enum):
    IMAGE = "image"
    BATCH = "batch"


class RelevanceSign(str, enum.Enum):
    NEGATED = "negated"
    POSITIVE = "positive"


@dataclasses.dataclass(frozen=True)
class CDPrunerOptions:
    kept_tokens: int = option(64, "cdpruner: tokens kept (the DPP's greedy steps)", minimum=1)
    relevance_scope: RelevanceScope = option(RelevanceScope.IMAGE, "cdpruner: min-max of the relevance per image, or "
                                             "over the batch (the released code)")
    relevance_sign: RelevanceSign = option(RelevanceSign.POSITIVE, "cdpruner: positive (tokens like the question "
                                           "first; measured best in the LLM's embedding space), or negated (the "
                                           "released rule, made for CLIP's text space)")


def relevance(tokens, question, mask, scope: str = "image", sign: str = "positive"):
    """``[B, N]`` relevance of ``tokens [B, N, D]`` to ``question [B, S, D]`` (rows where ``mask [B, S]`` is 1):
    cosine, averaged over the question's rows, signed, min-max normalised (per image or over the batch)."""
    import torch

    unit = tokens / torch.clamp(torch.linalg.vector_norm(tokens, dim=-1, keepdim=True), min=1e-12)
    text = question / torch.clamp(torch.linalg.vector_norm(question, dim=-1, keepdim=True), min=1e-12)
    cosine = torch.matmul(unit, text.transpose(1, 2))  # [B, N, S]
    weight = mask.to(cosine.dtype).unsqueeze(1)  # [B, 1, S]
    mean = (cosine * weight).sum(-1) / torch.clamp(weight.sum(-1), min=1.0)  # [B, N]
    score = -mean if sign == "negated" else mean
    if scope == "batch":
        low, high = score.min(), score.max()
    else:
        low, high = score.min(dim=-1, keepdim=True).values, score.max(dim=-1, keepdim=True).values
    return (score - low + 1e-6) / (high - low)


def dpp_greedy(kernel, keep: int):
    """``[B, keep]`` indices chosen by the fast greedy MAP of the DPP with ``kernel [B, N, N]``, in the order chosen."""
    import torch

    batch, num = kernel.shape[0], kernel.shape[1]
    positions = torch.arange(num, device=kernel.device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2)
    rows = None  # [B, t, N]: the rows written so far, grown by one Concat a step (a list stacked every step
    picks = []   # would put O(keep^2) nodes in the graph)
    for step in range(keep):
        pick = torch.argmax(di2s, dim=-1)  # [B]; the first on exact ties, as the released code's torch.argmax
        row = kernel.gather(1, pick.view(batch, 1, 1).expand(batch, 1, num))  # K[j]  [B, 1, N]
        if rows is not None:
            at_pick = rows.gather(2, pick.view(batch, 1, 1).expand(batch, step, 1))  # c_t[j]  [B, t, 1]
            row = row - torch.matmul(at_pick.transpose(1, 2), rows)  # sum_t c_t[j] c_t
        pivot = di2s.gather(1, pick.unsqueeze(-1)).unsqueeze(-1)  # [B, 1, 1]
        row = row / torch.sqrt(torch.clamp(pivot, min=1e-12))
        rows = row if rows is None else torch.cat([rows, row], dim=1)
        picks.append(pick)
        di2s = torch.where(positions.unsqueeze(0) == pick.unsqueeze(-1), torch.full_like(di2s, float("-inf")),
                           di2s - (row * row).squeeze(1))
    return torch.stack(picks, dim=-1)


def cdpruner_indices(tokens, question, mask, keep: int, scope: str = "image", sign: str = "positive",
                     image_embeds=None):
    """``([B, keep] raster-order indices, relevance [B, N])`` CDPruner keeps of ``tokens [B, N, D]`` (float32).
    ``image_embeds [B, N, E]``: what the question is compared with when it is CLIP text (the released source);
    None: the tokens themselves (the question in the LLM's embedding space)."""
    import torch

    from ..ranking import top_indices

    tokens, question = tokens.float(), question.float()
    unit = tokens / torch.clamp(torch.linalg.vector_norm(tokens, dim=-1, keepdim=True), min=1e-12)
    similarity = torch.matmul(unit, unit.transpose(1, 2))  # [B, N, N]
    score = relevance(tokens if image_embeds is None else image_embeds.float(), question, mask, scope, sign)
    kernel = score.unsqueeze(2) * similarity * score.unsqueeze(1)
    picks = dpp_greedy(kernel, keep)
    # raster order, sorted as floats (exact below 2**24): TopK on float is what every runtime takes
    return picks.gather(-1, top_indices(picks.to(kernel.dtype), keep, largest=False)), score


NEAR_TIE = 1e-4  # a greedy step whose two best residuals are closer than this x the kernel's largest diagonal


def moved_within_ties(features, question_embeds, question_mask, config, candidate, image_embeds=None) -> list:
    """For each image, whether ``candidate`` (another runtime's kept indices) is a set the reference may take up to
    float error: the DPP is re-run in float64 on the reference's projected tokens, and a set is allowed when, at or
    before the first step whose reference pick the candidate lacks, the two best remaining residuals were within
    ``NEAR_TIE`` of the kernel's largest diagonal entry. Why that bound: each greedy step's residuals are
    differences of kernel entries (cancellation), so float32 runtimes that compute the similarity in another order
    (MLAS vs MKL) may swap the argmax of residuals that close; 1e-4 is about 100x the float32 error those residuals
    accumulate over 64 steps. A set that differs where no step was that close is a real disagreement."""
    import torch

    scope = getattr(config.relevance_scope, "value", config.relevance_scope)
    sign = getattr(config.relevance_sign, "value", config.relevance_sign)
    tokens, question = features.double(), question_embeds.double()
    unit = tokens / torch.clamp(torch.linalg.vector_norm(tokens, dim=-1, keepdim=True), min=1e-12)
    against = tokens if image_embeds is None else image_embeds.double()
    score = relevance(against, question, question_mask.double(), scope, sign)
    kernel = score.unsqueeze(2) * torch.matmul(unit, unit.transpose(1, 2)) * score.unsqueeze(1)
    out = []
    for b in range(kernel.shape[0]):
        wanted = {int(i) for i in candidate[b]}
        scale = float(torch.diagonal(kernel[b]).max())
        di2s, rows, allowed = torch.diagonal(kernel[b]).clone(), [], False
        for _ in range(config.kept_tokens):
            top = torch.topk(di2s, 2).values if di2s.numel() > 1 else di2s
            allowed = allowed or (len(top) > 1 and float(top[0] - top[1]) < NEAR_TIE * scale)
            pick = int(torch.argmax(di2s))
            if pick not in wanted:
                break
            row = kernel[b, pick] - sum((r[pick] * r for r in rows), torch.zeros_like(di2s))
            row = row / torch.sqrt(torch.clamp(di2s[pick], min=1e-12))
            rows.append(row)
            di2s = di2s - row * row
            di2s[pick] = float("-inf")
        else:
            allowed = True  # every reference pick is in the candidate: the same set
        out.append(allowed)
    return out


def run(encoder, features, q, k, question_embeds=None, question_mask=None, image_embeds=None):
    """``features``: the projected patches (the similarity is the released code's, after the projector);
    ``image_embeds``: the patches' CLIP image embeddings, with a CLIP text side (``build --text-encoder``)."""
    from ...errors import InputError

    if question_embeds is None or question_mask is None:
        raise InputError("cdpruner keeps the tokens relevant to the question: give the question's embeddings")
    config = encoder.reducer
    against = features if image_embeds is None else image_embeds
    if question_embeds.shape[-1] != against.shape[-1]:
        space = "the LLM's embedding space" if image_embeds is None else "CLIP's text-image space"
        raise InputError(f"the question's embeddings are {question_embeds.shape[-1]} wide but the tokens they are "
                         f"compared with {against.shape[-1]}: cdpruner compares them in {space}")
    indices, _ = cdpruner_indices(features, question_embeds, question_mask, config.kept_tokens,
                                  getattr(config.relevance_scope, "value", config.relevance_scope),
                                  getattr(config.relevance_sign, "value", config.relevance_sign), image_embeds)
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1])), indices


def explain(features, q, k, config, num_heads, prefix, importance, question_embeds=None, question_mask=None,
            image_embeds=None):
    """What ``inspect`` draws: each patch's relevance to the question (the heat map) and the kept set."""
    from ..explain import Explanation

    indices, score = cdpruner_indices(features, question_embeds, question_mask, config.kept_tokens,
                                      getattr(config.relevance_scope, "value", config.relevance_scope),
                                      getattr(config.relevance_sign, "value", config.relevance_sign), image_embeds)
    kept = indices[0].tolist()
    return Explanation(scores=score[0].tolist(), outliers=len(kept), kept=kept, sampled=[], neighbors={},
                       pruned_only_in_extra=sorted(set(range(features.shape[1])) - set(kept)), truncated=False)


SPEC = register(ReducerSpec(
    name="cdpruner", help="fixed count: a conditional DPP over the projected tokens, relevance to the question "
    "(the graph takes the question's embeddings)",
    adaptive=False, options=CDPrunerOptions, run=run, explain=explain, projected=True, scoring_layer=None, listing=40,
    near_ties=moved_within_ties,
    inputs=QUESTION_INPUTS, count=lambda config, num_patches: config.kept_tokens,
    legend=("relevance to the question", "{method}: {kept} chosen (red) = {tokens} tokens of {patches}",
            "grey: dropped"),
))
