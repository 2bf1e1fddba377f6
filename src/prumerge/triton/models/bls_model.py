"""Triton Python-backend model ``prumerge`` (decoupled, BLS): the one users call. Image bytes + prompt in, text
streamed out. It preprocesses with the artifact's own settings, calls ``prumerge_vision`` *through Triton*, then
streams ``prumerge_llm``'s answer back, adding the visual token counts and per-stage timings to the final response.

Many users at once: ``execute`` is a coroutine (the Python backend runs it on one event loop per instance, 24.04+),
so while one request waits for its vision call or its next LLM piece, the next request starts. Concurrent users'
vision calls therefore reach ``prumerge_vision`` together and meet in its dynamic batcher, and their answers are
decoded by as many ``prumerge_llm`` instances as the repository has. At most ``max_inflight`` requests (a config
parameter, ``prumerge-export triton --max-inflight``) are worked on at once; the backend itself sets no bound,
so later ones wait here for a slot. A bad image fails its own request only. A client that cancels stops
receiving at the next piece (its sender is asked before every send), and its decode stops too: the entry model
raises the decode's flag on the :class:`~prumerge.triton.cancel.CancelBoard` (this backend cannot cancel a BLS
request) and keeps its slot until ``prumerge_llm`` has ended the stream."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from prumerge.artifact.contract import INPUT_NAME
from prumerge.artifact.manifest import Manifest
from prumerge.errors import PruMergeError
from prumerge.runtime.preprocess import preprocess_batch
from prumerge.triton.cancel import CancelBoard
from prumerge.triton.models._common import artifact_dir, parameter, text
from prumerge.triton.repository import QUESTION_ROWS_MULTIPLE

GENERATION = ("MAX_NEW_TOKENS", "TEMPERATURE", "TOP_P", "SEED")


class Cancelled(Exception):
    """The client went away: stop forwarding its answer."""


class TritonPythonModel:
    def initialize(self, args):
        manifest = Manifest.read(artifact_dir(args))
        self.preprocess = manifest.preprocess
        self.input_dtype = np.dtype(manifest.vision.inputs[0].dtype)
        self.max_inflight = int(parameter(args, "max_inflight", "16"))
        # blocking work (decoding PNGs, waiting for the next LLM piece) runs here, never on the event loop
        self.workers = ThreadPoolExecutor(max_workers=self.max_inflight + 1, thread_name_prefix="prumerge-bls")
        self.slots = None  # an asyncio.Semaphore, made on the backend's own loop at the first request
        self.cancels = CancelBoard.for_repository(args["model_repository"])
        self.questions = None  # a graph that reads the question: its embedder (the artifact's table or text graph)
        if len(manifest.vision.inputs) > 1:
            from prumerge.runtime.question import QuestionEmbedder

            self.questions = QuestionEmbedder.from_artifact(artifact_dir(args), manifest)

    async def execute(self, requests):
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.max_inflight)
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    def finalize(self):
        self.workers.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, request):
        sender = request.get_response_sender()
        async with self.slots:
            try:
                await self._answer(request, sender)
            except Cancelled:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except (PruMergeError, pb_utils.TritonModelException, ValueError) as exc:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    async def _answer(self, request, sender):
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        images = [bytes(b) for b in pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)]
        pixels = await loop.run_in_executor(self.workers, preprocess_batch, images, self.preprocess)  # InputError names a bad image
        pixels = pixels.astype(self.input_dtype)
        preprocess_ms = (time.perf_counter() - start) * 1e3
        vision_start = time.perf_counter()
        vision_inputs = [pb_utils.Tensor(INPUT_NAME, pixels)]
        if self.questions is not None:  # the reducer keeps what the question asks for: its rows go with the pixels
            prompt = text(pb_utils, request, "PROMPT")
            question = await loop.run_in_executor(self.workers, self.questions.arrays, prompt, len(pixels),
                                                  QUESTION_ROWS_MULTIPLE)
            vision_inputs += [pb_utils.Tensor(name, array) for name, array in question.items()]
        vision = await pb_utils.InferenceRequest(model_name="prumerge_vision", requested_output_names=["tokens", "num_tokens"],
                                                 inputs=vision_inputs).async_exec()
        if vision.has_error():
            raise PruMergeError(f"prumerge_vision: {vision.error().message()}")
        tokens = pb_utils.get_output_tensor_by_name(vision, "tokens").as_numpy()
        counts = pb_utils.get_output_tensor_by_name(vision, "num_tokens").as_numpy().reshape(-1).astype(np.int64)
        visual = np.concatenate([tokens[b, : counts[b]] for b in range(len(counts))]).astype(np.float32)
        vision_ms = (time.perf_counter() - vision_start) * 1e3
        if sender.is_cancelled():
            raise Cancelled()
        key = self.cancels.new_key()
        inputs = [pb_utils.get_input_tensor_by_name(request, "PROMPT"), pb_utils.Tensor("VISUAL_TOKENS", visual),
                  pb_utils.Tensor("VISUAL_COUNTS", counts), pb_utils.Tensor("CANCEL_KEY", np.array([key.encode()], dtype=object))]
        inputs += [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in GENERATION) if t is not None]
        llm = pb_utils.InferenceRequest(model_name="prumerge_llm", requested_output_names=["TEXT", "RESULT"], inputs=inputs)
        responses = iter(await llm.async_exec(decoupled=True))
        try:
            await self._relay(loop, responses, sender, start, preprocess_ms, vision_ms, counts, key)
        finally:
            self.cancels.clear(key)

    async def _relay(self, loop, responses, sender, start, preprocess_ms, vision_ms, counts, key):
        """Forward the LLM's pieces; on a cancelled client, flag the decode and wait for its stream to end."""
        while (response := await loop.run_in_executor(self.workers, next, responses, None)) is not None:
            if response.has_error():
                raise PruMergeError(f"prumerge_llm: {response.error().message()}")
            if sender.is_cancelled():
                self.cancels.cancel(key)
                while await loop.run_in_executor(self.workers, next, responses, None) is not None:
                    pass  # at most a piece or two: the decode stops at its next token
                raise Cancelled()
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
