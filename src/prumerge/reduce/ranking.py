"""Top-k with one tie rule for every runtime: equal values are ranked by the lower patch index first.

ONNX's TopK defines exactly this tie-break ("the element with the lower index will appear first"), and the exported
graph uses TopK; ``torch.topk`` on CPU does not promise any order among equal values. In eager mode the same rule
is had from a stable sort, so PyTorch, onnxruntime and the reference pick the same patch when two values tie
exactly (duplicated patches, flat image regions), and validation never sees an exact tie as a disagreement.
"""

from __future__ import annotations

import torch


def tracing() -> bool:
    """True while torch.onnx / torch.export / jit trace the graph: data checks must not enter the graph then."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    exporting = getattr(torch.onnx, "is_in_onnx_export", lambda: False)()
    return bool(compiling or exporting or torch.jit.is_tracing())


def top_indices(values: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest (``largest=False``: smallest) values on the last axis, ties by lowest index."""
    if tracing():
        return torch.topk(values, k, dim=-1, largest=largest, sorted=True).indices
    return torch.sort(values, dim=-1, descending=largest, stable=True).indices[..., :k]
