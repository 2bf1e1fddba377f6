"""Triton Python-backend model ``prumerge_vision`` (the CPU variant): the artifact's vision graph on prumerge's own
onnxruntime session. Triton's dynamic batcher hands several requests to one ``execute``; they run as one batch
(a graph that reads the question: requests whose questions have as many rows, which the batcher groups)."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from prumerge.artifact.contract import INPUT_NAME, OUTPUT_NAMES, QUESTION_INPUTS
from prumerge.errors import PruMergeError
from prumerge.runtime.vision import VisionSession
from prumerge.triton.models._common import artifact_dir


class TritonPythonModel:
    def initialize(self, args):
        self.session = VisionSession.open(artifact_dir(args), provider="cpu", verify=True)

    def execute(self, requests):
        pixels = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        questions = [self._question(r) for r in requests]
        sizes = [len(p) for p in pixels]
        rows = {None if q is None else q[QUESTION_INPUTS[0]].shape[1] for q in questions}
        if len(rows) > 1:  # questions of several lengths (or some without one) cannot be joined: one by one
            return [self._one(p, q) for p, q in zip(pixels, questions)]
        try:
            joined = {n: np.concatenate([q[n] for q in questions]) for n in QUESTION_INPUTS} if questions[0] else None
            out = self.session.run_pixels(np.concatenate(pixels), joined)
        except PruMergeError as exc:  # one bad batch member must not take the others down: retry one by one
            return [self._one(p, q) for p, q in zip(pixels, questions)] if len(pixels) > 1 else [_error(exc)]
        responses, start = [], 0
        arrays = {"tokens": out.tokens, "num_tokens": out.num_tokens, "indices": out.indices, "truncated": out.truncated}
        for size in sizes:
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(arrays[name][start: start + size]))
                                                         for name in OUTPUT_NAMES]))
            start += size
        return responses

    def _question(self, request):
        """The request's question arrays (None when it gives none)."""
        tensors = {n: pb_utils.get_input_tensor_by_name(request, n) for n in QUESTION_INPUTS}
        return None if any(t is None for t in tensors.values()) else {n: t.as_numpy() for n, t in tensors.items()}

    def _one(self, pixels, question=None):
        try:
            out = self.session.run_pixels(pixels, question)
        except PruMergeError as exc:
            return _error(exc)
        arrays = {"tokens": out.tokens, "num_tokens": out.num_tokens, "indices": out.indices, "truncated": out.truncated}
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(arrays[name])) for name in OUTPUT_NAMES])


def _error(exc):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
