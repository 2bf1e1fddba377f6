"""One vision-session interface, two implementations (onnxruntime: :mod:`.vision`, TensorRT: :mod:`.tensorrt`).

What every session shares lives here, once: reading the artifact's input spec and preprocessing, the input checks
(shape, dtype, finiteness: a NaN image is refused the same way on every backend), splitting batches over the
graph's limit and joining the parts, and the output contract bound by name. An implementation only runs one batch
and returns ``{output name: array}``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..artifact.contract import OUTPUT_NAMES, PADDING_INDEX, VisionOutput, concat_outputs
from ..errors import InputError
from .preprocess import ImageLike, preprocess_batch


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """What a session needs of a graph: its input and output specs (``TensorSpec``) and its batch limit. An
    artifact's ``GraphSection`` has these fields; a bare graph file gives them from the graph itself."""

    inputs: list
    outputs: list
    batch_max: int = 1


class VisionSessionBase:
    provider = "?"

    def __init__(self, directory: Path | None, manifest, graph, batch_max: int | None = None) -> None:
        """``graph``: the artifact's ``GraphSection``, or a bare graph file's :class:`GraphIO`. ``manifest`` None: a
        bare graph file (build validation, INT8 comparison), which has no preprocessing config (``run_pixels``
        only) and uses the contract's padding index."""
        self.directory = Path(directory) if directory is not None else None
        self.manifest = manifest
        self.graph = graph
        self.preprocess = manifest.preprocess if manifest is not None else None
        spec = graph.inputs[0]
        self.input_name = spec.name
        self.input_dtype = np.dtype(spec.dtype)
        self.image_size = int(spec.shape[-1])
        self.batch_max = int(batch_max if batch_max is not None else graph.batch_max)
        self.padding_index = manifest.reducer.padding_index if manifest is not None else PADDING_INDEX

    def run(self, images: ImageLike | list[ImageLike]) -> VisionOutput:
        """Paths, bytes, PIL images or HWC arrays -> reduced tokens (preprocessed as the checkpoint's processor does)."""
        if self.preprocess is None:
            raise InputError("this session runs a bare graph file, which has no preprocessing config: pass pixels")
        return self.run_pixels(preprocess_batch(images, self.preprocess))

    def run_pixels(self, pixel_values: np.ndarray) -> VisionOutput:
        """``[B, 3, S, S]`` normalised pixels -> reduced tokens. Batches over ``batch_max`` are split."""
        feed = self.check_pixels(pixel_values)
        parts = [VisionOutput.from_named(self.run_batch(feed[i: i + self.batch_max]))
                 for i in range(0, len(feed), self.batch_max)]
        return parts[0] if len(parts) == 1 else concat_outputs(parts, self.padding_index)

    def check_pixels(self, pixel_values) -> np.ndarray:
        if not isinstance(pixel_values, np.ndarray):
            raise InputError(f"pixel_values must be a numpy array, got {type(pixel_values).__name__}")
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected or not len(pixel_values):
            raise InputError(f"pixel_values must have shape [batch, 3, {self.image_size}, {self.image_size}], got {pixel_values.shape}")
        if not np.isfinite(pixel_values).all():
            raise InputError("pixel_values contains NaN or Inf")
        return np.ascontiguousarray(pixel_values.astype(self.input_dtype, copy=False))

    def run_batch(self, feed: np.ndarray) -> dict:  # pragma: no cover - each implementation has its own
        """One batch (at most ``batch_max``) -> ``{name: array}`` for every name in ``OUTPUT_NAMES``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (device memory, streams); the session is unusable afterwards."""


__all__ = ["VisionSessionBase", "OUTPUT_NAMES"]
