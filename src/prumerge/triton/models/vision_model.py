"""Triton Python-backend model ``prumerge_vision`` (the CPU variant): the artifact's vision graph on prumerge's own
onnxruntime session. Triton's dynamic batcher hands several requests to one ``execute``; they run as one batch."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from prumerge.artifact.contract import INPUT_NAME, OUTPUT_NAMES
from prumerge.errors import PruMergeError
from prumerge.runtime.vision import VisionSession
from prumerge.triton.models._common import artifact_dir


class TritonPythonModel:
    def initialize(self, args):
        self.session = VisionSession.open(artifact_dir(args), provider="cpu", verify=True)

    def execute(self, requests):
        pixels = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        sizes = [len(p) for p in pixels]
        try:
            out = self.session.run_pixels(np.concatenate(pixels))
        except PruMergeError as exc:  # one bad batch member must not take the others down: retry one by one
            return [self._one(p) for p in pixels] if len(pixels) > 1 else [_error(exc)]
        responses, start = [], 0
        arrays = {"tokens": out.tokens, "num_tokens": out.num_tokens, "indices": out.indices, "truncated": out.truncated}
        for size in sizes:
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(arrays[name][start: start + size]))
                                                         for name in OUTPUT_NAMES]))
            start += size
        return responses

    def _one(self, pixels):
        try:
            out = self.session.run_pixels(pixels)
        except PruMergeError as exc:
            return _error(exc)
        arrays = {"tokens": out.tokens, "num_tokens": out.num_tokens, "indices": out.indices, "truncated": out.truncated}
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(arrays[name])) for name in OUTPUT_NAMES])


def _error(exc):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
