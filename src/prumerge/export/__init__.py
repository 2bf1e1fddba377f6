"""Build side: vision tower + reducer (+ projector) -> ONNX, graph checks, artifact directory with manifest.

Submodules import torch/onnx on use; importing ``prumerge.export`` itself is cheap.
"""

from .._lazy import lazy_getattr

_LAZY = {
    "BuildOptions": ".options",
    "build_artifact": ".build",
    "verify_artifact": ".verify",
    "inspect_artifact": ".verify",
    "export_onnx": ".graph",
    "Contract": ".graph",
    "VisionGraph": ".graph",
    "op_support": ".checks",
    "check_onnx": ".checks",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
