"""prumerge: PruMerge / PruMerge+ visual-token reduction inside a deployable LLaVA vision graph.

Heavy dependencies load on first use: ``import prumerge`` (and ``prumerge.runtime`` on a device) needs no torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "PruMergeEncoder": "prumerge.encoder",
    "ReducedTokens": "prumerge.reduce.reducer",
    "reduce_tokens": "prumerge.reduce.reducer",
    "ReducerConfig": "prumerge.reduce.config",
    "Method": "prumerge.reduce.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prumerge' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
