"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175) as a registered method: the max-min diverse subset of the
projected tokens; fixed count ``diverse_tokens``. The torch code is ``prumerge.reduce.divprune`` (parity-tested
against the released code)."""

from __future__ import annotations

import dataclasses

from ..registry import ReducerSpec, option, register


@dataclasses.dataclass(frozen=True)
class DivPruneOptions:
    diverse_tokens: int = option(64, "divprune: tokens kept", minimum=1)


def run(encoder, features, q, k):
    """``features``: the projected patches (chosen among the tokens the LLM receives, as the official code)."""
    from ..divprune import divprune_tokens

    return divprune_tokens(features, encoder.reducer.diverse_tokens)


def explain(features, q, k, config, num_heads, prefix, importance):
    from ..divprune import divprune_choice
    from ..explain import Explanation

    picks, closest = divprune_choice(features, config.diverse_tokens)
    kept = picks[0].tolist()
    return Explanation(scores=closest[0].tolist(), outliers=len(kept), kept=kept, sampled=[], neighbors={},
                       pruned_only_in_extra=sorted(set(range(features.shape[1])) - set(kept)), truncated=False)


SPEC = register(ReducerSpec(
    name="divprune", help="fixed count: the max-min diverse subset of the projected tokens",
    adaptive=False, options=DivPruneOptions, run=run, explain=explain, projected=True, scoring_layer=None,
    listing=30, count=lambda config, num_patches: config.diverse_tokens,
    legend=("distance to the nearest chosen token", "{method}: {kept} chosen (red) = {tokens} tokens of {patches}",
            "grey: dropped"),
))
