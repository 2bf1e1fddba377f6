"""VisionZip (Yang et al., arXiv 2412.04467) as a registered method: dominant tokens by CLS attention of the feature
layer, the rest merged into contextual tokens; fixed count ``dominant_tokens + contextual_tokens``. The torch code is
``prumerge.reduce.visionzip`` (parity-tested against the released code)."""

from __future__ import annotations

import dataclasses

from ..registry import ReducerSpec, option, register


@dataclasses.dataclass(frozen=True)
class VisionZipOptions:
    """Defaults: the official 64-token setting, CLS counted among the dominant tokens."""

    dominant_tokens: int = option(54, "visionzip: tokens kept by CLS attention (CLS itself counted)", minimum=2)
    contextual_tokens: int = option(10, "visionzip: merged contextual tokens", minimum=1)


def run(encoder, hidden, q, k):
    """In float32 whatever the graph's precision (as PruMerge), tokens back in the features' dtype."""
    from ..visionzip import visionzip_tokens

    config = encoder.reducer
    tokens, indices = visionzip_tokens(hidden.float(), q.float(), k.float(), config.dominant_tokens,
                                       config.contextual_tokens, encoder.num_heads, encoder.adapter.prefix_tokens,
                                       encoder.adapter.importance)
    return tokens.to(hidden.dtype), indices


def explain(features, q, k, config, num_heads, prefix, importance):
    from ..explain import Explanation
    from ..visionzip import visionzip_plan

    plan = visionzip_plan(q, k, features.shape[1], config.dominant_tokens, config.contextual_tokens, num_heads, prefix,
                          importance)
    targets, merged, assign = plan.targets[0].tolist(), plan.merged[0].tolist(), plan.assign[0].tolist()
    neighbors = {t: [p for p, a in zip(merged, assign) if a == i] for i, t in enumerate(targets)}
    kept = plan.dominant[0].tolist()
    return Explanation(scores=plan.scores[0].tolist(), outliers=len(kept), kept=kept, sampled=targets,
                       neighbors=neighbors, pruned_only_in_extra=[], truncated=False)


SPEC = register(ReducerSpec(
    name="visionzip", help="fixed count: dominant tokens by CLS attention + merged contextual tokens",
    adaptive=False, options=VisionZipOptions, run=run, explain=explain, scoring_layer="feature", listing=20,
    count=lambda config, num_patches: config.dominant_tokens + config.contextual_tokens,
    legend=("CLS attention (summed over heads) heat map", "{method}: {kept} dominant (red) + {sampled} contextual "
            "targets (cyan) = {tokens} tokens of {patches} (CLS among them)",
            "tint: merged into the contextual token of that colour"),
    summary=("{method}: {tokens} tokens of {patches} patches: {kept} dominant patches (+ CLS where the tower has "
             "one), {sampled} contextual tokens\ndominant patches: {kept_list}"),
))
