"""Triton Python-backend model ``prumerge`` (decoupled, BLS): the one users call. Image bytes + prompt in, text
streamed out. It preprocesses with the artifact's own settings, calls ``prumerge_vision`` *through Triton* (so
concurrent users' images meet in the dynamic batcher), then streams ``prumerge_llm``'s answer back, adding the
visual token counts and per-stage timings to the final response. A bad image fails its own request only."""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from prumerge.artifact.contract import INPUT_NAME
from prumerge.artifact.manifest import Manifest
from prumerge.artifact.preprocess_config import PreprocessConfig
from prumerge.errors import PruMergeError
from prumerge.runtime.preprocess import preprocess_batch
from prumerge.triton.models._common import artifact_dir

GENERATION = ("MAX_NEW_TOKENS", "TEMPERATURE", "TOP_P", "SEED")


class TritonPythonModel:
    def initialize(self, args):
        manifest = Manifest.read(artifact_dir(args))
        self.preprocess = PreprocessConfig.from_dict(manifest.preprocess)
        self.input_dtype = np.dtype(manifest.vision.inputs[0]["dtype"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._answer(request, sender)
            except (PruMergeError, pb_utils.TritonModelException, ValueError) as exc:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _answer(self, request, sender):
        start = time.perf_counter()
        images = [bytes(b) for b in pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)]
        pixels = preprocess_batch(images, self.preprocess).astype(self.input_dtype)  # InputError names a bad image
        preprocess_ms = (time.perf_counter() - start) * 1e3
        vision_start = time.perf_counter()
        vision = pb_utils.InferenceRequest(model_name="prumerge_vision", requested_output_names=["tokens", "num_tokens"],
                                           inputs=[pb_utils.Tensor(INPUT_NAME, pixels)]).exec()
        if vision.has_error():
            raise PruMergeError(f"prumerge_vision: {vision.error().message()}")
        tokens = pb_utils.get_output_tensor_by_name(vision, "tokens").as_numpy()
        counts = pb_utils.get_output_tensor_by_name(vision, "num_tokens").as_numpy().reshape(-1).astype(np.int64)
        visual = np.concatenate([tokens[b, : counts[b]] for b in range(len(counts))]).astype(np.float32)
        vision_ms = (time.perf_counter() - vision_start) * 1e3
        inputs = [pb_utils.get_input_tensor_by_name(request, "PROMPT"), pb_utils.Tensor("VISUAL_TOKENS", visual),
                  pb_utils.Tensor("VISUAL_COUNTS", counts)]
        inputs += [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in GENERATION) if t is not None]
        llm = pb_utils.InferenceRequest(model_name="prumerge_llm", requested_output_names=["TEXT", "RESULT"], inputs=inputs)
        for response in llm.exec(decoupled=True):
            if response.has_error():
                raise PruMergeError(f"prumerge_llm: {response.error().message()}")
            piece = pb_utils.get_output_tensor_by_name(response, "TEXT")
            result = pb_utils.get_output_tensor_by_name(response, "RESULT")
            if result is not None and result.as_numpy().reshape(-1)[0]:
                data = json.loads(result.as_numpy().reshape(-1)[0])
                data["timings_ms"] |= {"preprocess": round(preprocess_ms, 3), "vision": round(vision_ms, 3),
                                       "server_total": round((time.perf_counter() - start) * 1e3, 3)}
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("TEXT", np.array([b""], dtype=object)),
                    pb_utils.Tensor("VISUAL_TOKENS", counts),
                    pb_utils.Tensor("RESULT", np.array([json.dumps(data).encode()], dtype=object))]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            if piece is not None and piece.as_numpy().reshape(-1)[0]:
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("TEXT", piece.as_numpy()), pb_utils.Tensor("VISUAL_TOKENS", counts),
                    pb_utils.Tensor("RESULT", np.array([b""], dtype=object))]))
        raise PruMergeError("prumerge_llm ended without a final result")
