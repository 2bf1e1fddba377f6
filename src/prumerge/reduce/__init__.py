"""PruMerge / PruMerge+ in pure torch: CLS attention, IQR outlier budget, key-cosine merge, PruMerge+ sampling.

``prumerge.reduce.config`` is stdlib-only (the manifest and the torch-free runtime read it); the torch parts are
imported on first use so that importing the config does not pull in torch.
"""

from .._lazy import lazy_getattr

from .config import Method, ReducerConfig, default_capacity, max_outliers
from .prumerge_options import Attention, MergeWeights, Order

_LAZY = {
    "cls_attention": ".attention",
    "received_attention": ".attention",
    "merge_tokens": ".merge",
    "iqr_outlier_count": ".outliers",
    "linear_quantile": ".outliers",
    "ReducedTokens": ".reducer",
    "reduce_tokens": ".reducer",
    "Selection": ".selection",
    "plus_stride": ".selection",
    "select_tokens": ".selection",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "Attention",
    "MergeWeights",
    "Method",
    "Order",
    "ReducerConfig",
    "default_capacity",
    "max_outliers",
    *_LAZY,
]
