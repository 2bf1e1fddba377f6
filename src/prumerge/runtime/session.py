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

from ..artifact.contract import (INPUT_NAME, OUTPUT_NAMES, PADDING_INDEX, QUESTION_INPUTS, VisionOutput, concat_outputs,
                                 probe_question)
from ..errors import ArtifactError, InputError
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
    question_rows_max: int | None = None  # a TensorRT engine's profile bound on the question's tokens
    reducer = None  # a question-reading graph's reducer graph session (onnxruntime's: VisionSession.open_reducer)

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
        # a reducer that reads the question (cdpruner) takes its embedding rows beside the pixels
        self.question_inputs = tuple(s.name for s in graph.inputs[1:])
        unknown = [n for n in self.question_inputs if n not in QUESTION_INPUTS]
        if unknown or (self.question_inputs and self.question_inputs != QUESTION_INPUTS):
            raise ArtifactError(f"the vision graph takes {', '.join(s.name for s in graph.inputs)}; prumerge knows "
                                f"{INPUT_NAME} and optionally {', '.join(QUESTION_INPUTS)}")
        self.question_width = int(graph.inputs[1].shape[-1]) if self.question_inputs else None

    def probe_question(self, batch: int) -> dict | None:
        """The contract's fixed probe question for ``batch`` images when the graph reads one (None otherwise): what
        build-time checks and calibration feed a question-reading graph (``artifact.contract.probe_question``)."""
        return probe_question(batch, self.question_width) if self.question_inputs else None

    @property
    def needs_question(self) -> bool:
        """Whether the graph's reducer reads the question (``run`` then takes its embeddings)."""
        return bool(self.question_inputs)

    def run(self, images: ImageLike | list[ImageLike], question: dict | None = None) -> VisionOutput:
        """Paths, bytes, PIL images or HWC arrays -> reduced tokens (preprocessed as the checkpoint's processor does)."""
        if self.preprocess is None:
            raise InputError("this session runs a bare graph file, which has no preprocessing config: pass pixels")
        return self.run_pixels(preprocess_batch(images, self.preprocess), question)

    def run_pixels(self, pixel_values: np.ndarray, question: dict | None = None) -> VisionOutput:
        """``[B, 3, S, S]`` normalised pixels -> reduced tokens. Batches over ``batch_max`` are split.
        ``question``: ``{"question_embeds": [B, R, D], "question_mask": [B, R]}`` for a graph that reads it."""
        feed = self.check_pixels(pixel_values)
        extra = self.check_question(question, len(feed))
        parts = [VisionOutput.from_named(self.run_batch({self.input_name: feed[i: i + self.batch_max],
                                                         **{n: a[i: i + self.batch_max] for n, a in extra.items()}}))
                 for i in range(0, len(feed), self.batch_max)]
        return parts[0] if len(parts) == 1 else concat_outputs(parts, self.padding_index)

    def check_question(self, question: dict | None, batch: int) -> dict:
        """The question's arrays as the graph takes them, or one InputError; ``{}`` for a graph that reads none."""
        if not self.question_inputs:
            if question:
                raise InputError("this vision graph's reducer does not read the question: give none")
            return {}
        if not question or any(question.get(name) is None for name in QUESTION_INPUTS):
            raise InputError(f"this vision graph's reducer reads the question: give {' and '.join(QUESTION_INPUTS)}")
        embeds = np.asarray(question[QUESTION_INPUTS[0]], dtype=np.float32)
        mask = np.asarray(question[QUESTION_INPUTS[1]], dtype=np.float32)
        if embeds.ndim != 3 or embeds.shape[0] != batch or embeds.shape[2] != self.question_width or not embeds.shape[1]:
            raise InputError(f"{QUESTION_INPUTS[0]} must be [{batch}, rows, {self.question_width}], got {embeds.shape}")
        if self.question_rows_max is not None and embeds.shape[1] > self.question_rows_max:
            raise InputError(f"the question is {embeds.shape[1]} tokens long; this {self.provider} engine was built for "
                             f"at most {self.question_rows_max}: shorten it, or rebuild the engine with "
                             "--max-question-rows")
        if mask.shape != embeds.shape[:2] or not np.isin(mask, (0.0, 1.0)).all() or not mask.any(axis=1).all():
            raise InputError(f"{QUESTION_INPUTS[1]} must be [{batch}, {embeds.shape[1]}] of 0/1 with a real row per image")
        if not np.isfinite(embeds).all():
            raise InputError(f"{QUESTION_INPUTS[0]} contains NaN or Inf")
        return {QUESTION_INPUTS[0]: np.ascontiguousarray(embeds), QUESTION_INPUTS[1]: np.ascontiguousarray(mask)}

    def check_pixels(self, pixel_values) -> np.ndarray:
        if not isinstance(pixel_values, np.ndarray):
            raise InputError(f"pixel_values must be a numpy array, got {type(pixel_values).__name__}")
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected or not len(pixel_values):
            raise InputError(f"pixel_values must have shape [batch, 3, {self.image_size}, {self.image_size}], got {pixel_values.shape}")
        if not np.isfinite(pixel_values).all():
            raise InputError("pixel_values contains NaN or Inf")
        return np.ascontiguousarray(pixel_values.astype(self.input_dtype, copy=False))

    def run_batch(self, feed: dict) -> dict:  # pragma: no cover - each implementation has its own
        """One batch (``{input name: array}``, at most ``batch_max``) -> ``{name: array}`` for every name in
        ``OUTPUT_NAMES``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (device memory, streams); the session is unusable afterwards."""


__all__ = ["VisionSessionBase", "OUTPUT_NAMES"]
