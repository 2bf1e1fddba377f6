"""prumerge: PruMerge / PruMerge+ visual-token reduction inside a deployable LLaVA vision graph.

Heavy dependencies load on first use: ``import prumerge`` (and ``prumerge.runtime`` on a device) needs no torch.
"""

from ._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "PruMergeEncoder": ".model.encoder",
    "ReducedTokens": ".reduce.reducer",
    "reduce_tokens": ".reduce.reducer",
    "ReducerConfig": ".reduce.config",
    "Method": ".reduce.config",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["__version__", *_LAZY]
