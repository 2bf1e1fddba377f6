"""Triton Python-backend model ``prumerge_llm`` (decoupled): prompt assembly, the int4 decoder and streaming, by
prumerge's own :class:`~prumerge.runtime.Pipeline` (the code path of ``prumerge-export run``), fed the visual
tokens the vision model produced. Each text piece is one response; the last carries ``RESULT`` (counts, timings).
One request decodes at a time per instance (``prumerge-export triton --llm-instances N`` overlaps N); a cancelled
request stops decoding at its next token: cancelled by its own client, or through the entry model, whose client
leaving raises the flag of the request's ``CANCEL_KEY`` (:mod:`prumerge.triton.cancel`)."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from prumerge.errors import PruMergeError
from prumerge.runtime.pipeline import Pipeline, SamplingParams
from prumerge.triton.cancel import CancelBoard
from prumerge.triton.models._common import artifact_dir, instance_threads, scalar, text


class TritonPythonModel:
    def initialize(self, args):
        self.pipeline = Pipeline.from_artifacts(artifact_dir(args), with_vision=False, llm_threads=instance_threads(args))
        self.cancels = CancelBoard.for_repository(args["model_repository"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                tokens = pb_utils.get_input_tensor_by_name(request, "VISUAL_TOKENS")
                counts = pb_utils.get_input_tensor_by_name(request, "VISUAL_COUNTS")
                visual = []
                if tokens is not None and counts is not None:
                    rows = tokens.as_numpy()
                    bounds = np.cumsum([0, *counts.as_numpy().reshape(-1).tolist()])
                    visual = [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
                key = text(pb_utils, request, "CANCEL_KEY") or None
                max_new_tokens = int(scalar(pb_utils, request, "MAX_NEW_TOKENS", 128))
                sampling = SamplingParams(max_new_tokens, float(scalar(pb_utils, request, "TEMPERATURE", 0.0)),
                                          float(scalar(pb_utils, request, "TOP_P", 1.0)), (),
                                          scalar(pb_utils, request, "SEED", None))
                stream = self.pipeline.generate(None, text(pb_utils, request, "PROMPT"), visual_tokens=visual,
                                                sampling=sampling, stream=True)
                sent = 0
                for piece in stream:
                    if sender.is_cancelled() or self.cancels.cancelled(key):  # the client went away: free this decode
                        stream.close()
                        pb_utils.Logger.log_info(f"prumerge_llm: cancelled after {sent} pieces "
                                                 f"(of at most {max_new_tokens} tokens)")
                        break
                    sender.send(_response(piece, ""))
                    sent += 1
                else:
                    sender.send(_response("", json.dumps(stream.result.to_dict())),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except PruMergeError as exc:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None


def _response(piece: str, result: str):
    return pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", np.array([piece.encode()], dtype=object)),
                                       pb_utils.Tensor("RESULT", np.array([result.encode()], dtype=object))])
