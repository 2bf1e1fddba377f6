"""PruMerge and PruMerge+ (Shang et al., arXiv 2403.15388): an adaptive count by the IQR outlier rule on CLS
attention, each kept token merged with its key-cosine-nearest patches; PruMerge+ adds raster samples.

The torch code is ``prumerge.reduce.reducer.reduce_tokens`` and the modules it calls (attention, outliers,
selection, merge): both methods share it and its options, declared once in ``prumerge.reduce.prumerge_options`` (a
leaf module, because that torch code reads the option types too and a method module may not be imported back). The defaults are the official
behaviour (released PruMerge checkpoints were trained on that token layout); every other choice is a named option.
"""

from __future__ import annotations

from ..prumerge_options import PruMergeOptions
from ..registry import ReducerSpec, register


def run(encoder, hidden, q, k):
    """The encoder's PruMerge: its tower's prefix and importance, one scoring for every caller."""
    from ..reducer import reduce_tokens

    prefix = encoder.adapter.prefix_tokens
    return reduce_tokens(hidden[:, prefix:], q, k, encoder.reducer, num_heads=encoder.num_heads, prefix=prefix,
                         importance=encoder.adapter.importance)


def explain(features, q, k, config, num_heads, prefix, importance):
    from ..explain import explain_prumerge

    return explain_prumerge(features, q, k, config, num_heads, prefix, importance)


SUMMARY = ("{method}: {kept} kept + {sampled} sampled + 1 extra = {tokens} tokens of {patches} patches ({outliers} "
           "IQR outliers); {extra_only} patches only in the extra token\nkept patches by attention: {kept_list}")
LEGEND = ("CLS attention heat map", "{method}: {kept} kept (red, ranked) + {sampled} sampled (cyan) + 1 extra = "
          "{tokens} tokens of {patches}", "tint: merged into the kept token of that colour; grey: only in the extra token")

SPEC = register(ReducerSpec(
    name="prumerge", help="adaptive count: IQR outliers of CLS attention, merged with their neighbours",
    adaptive=True, options=PruMergeOptions, run=run, explain=explain, legend=LEGEND, summary=SUMMARY, ranked=True,
    listing=10,
))
PLUS_SPEC = register(ReducerSpec(
    name="prumerge+", help="PruMerge plus spatially uniform samples (about 4x the tokens)",
    adaptive=True, options=PruMergeOptions, run=run, explain=explain, legend=LEGEND, summary=SUMMARY, ranked=True,
    listing=11,
))
