"""``TensorRTSession``: the artifact's own TensorRT engine, run by polygraphy's ``TrtRunner``.

polygraphy (NVIDIA's, pure Python over TensorRT and the CUDA runtime) owns the device side: the execution context,
the stream, input/output buffers, and outputs whose shape TensorRT learns only while running (the dynamic
contract's data-dependent token axis, through an output allocator). What is prumerge's is the refusal of an engine
built for another GPU or TensorRT version, and the shared checks and output contract of
:class:`~prumerge.runtime.session.VisionSessionBase` (outputs bound by name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact.engine import device_facts, engine_mismatch
from ..artifact.manifest import inside
from ..errors import ArtifactError, BackendUnavailableError
from .session import VisionSessionBase


class TensorRTSession(VisionSessionBase):
    """The artifact's engine on TensorRT. :meth:`close` (or ``with``) releases the GPU memory and stream."""

    def __init__(self, directory: Path, manifest, graph) -> None:
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError("TensorRT is not installed; use provider cpu/cuda (onnxruntime) instead") from exc
        try:
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError as exc:
            raise BackendUnavailableError("the TensorRT session runs through polygraphy: pip install 'prumerge[trt]'") from exc
        engine_facts = graph.engine
        if not engine_facts:
            raise ArtifactError(f"{directory} has no TensorRT engine; build one on this device: prumerge-export engine {directory}")
        path = inside(directory, engine_facts.file)
        problem = engine_mismatch(engine_facts.device(), device_facts())
        if problem:
            raise ArtifactError(f"{path} cannot run here: {problem}")
        super().__init__(directory, manifest, graph, batch_max=engine_facts.max_batch)
        self.provider = "TensorRT"
        self.question_rows_max = engine_facts.options.get("max_question_rows")
        self.runner = TrtRunner(EngineFromBytes(path.read_bytes()))
        try:
            self.runner.activate()
        except Exception as exc:  # deserialisation or context creation failed
            raise ArtifactError(f"TensorRT could not load {path}: {exc}") from exc

    def run_batch(self, feed: dict) -> dict:
        try:
            outputs = self.runner.infer(feed)
        except Exception as exc:
            raise ArtifactError(f"TensorRT execution failed: {exc}") from exc
        return {name: np.asarray(value) for name, value in outputs.items()}

    def close(self) -> None:
        if getattr(self, "runner", None) is not None and self.runner.is_active:
            self.runner.deactivate()

    def __enter__(self) -> "TensorRTSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass
