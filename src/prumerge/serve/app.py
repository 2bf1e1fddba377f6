"""``prumerge-export serve``: an artifact behind OpenAI's chat-completions API (Starlette + uvicorn, no torch).

Why it looks like this:

* **Loaded once.** The artifact's pipelines (its own graph and, for a ``--baseline`` build, the unreduced one) are
  opened when the server starts; every request reuses them, where ``run`` loads the artifact per question.
* **One generation at a time, a bounded queue.** On a 2-core CPU or a Jetson, two generations at once only split
  the same cores (onnxruntime already uses them all), so one worker thread runs requests in arrival order and the
  others wait; at most ``max_queue`` wait, and one more is answered 429 with ``Retry-After`` (an estimate from the
  recent requests' times) instead of piling up. Throughput is the serial pipeline's; latency is honest.
* **A client that leaves stops its generation.** A streamed request whose client disconnects is marked cancelled;
  the worker stops after the current decode step (``Pipeline``'s stream is closed), and a request still waiting is
  dropped before it starts.
* **One bad request never disturbs the others.** Everything about a request is checked before it is queued
  (``serve.openai_api``), and an error while it runs is that request's 4xx (bad input) or 500, never the worker's end.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
from pathlib import Path

from ..errors import InputError, PruMergeError
from . import openai_api as api

HEALTH_PATH = "/health"


class Job:
    """One request on its way through the worker: what to run, where its events go, whether its client left."""

    def __init__(self, request: api.ChatRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.queued_at = time.perf_counter()
        self.started_at: float | None = None

    def emit(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    """The generation thread and its bounded queue."""

    def __init__(self, pipelines: dict, max_queue: int) -> None:
        self.pipelines = pipelines  # method -> Pipeline
        self.jobs: queue.Queue = queue.Queue()
        self.max_queue = max_queue
        self.pending = 0  # the running request and the waiting ones (admitted while <= max_queue wait)
        self.lock = threading.Lock()
        self.cancelled = []  # pieces each cancelled generation had produced when it stopped (the last 16)
        self.recent: list = []  # seconds the last requests took (for Retry-After)
        self.thread = threading.Thread(target=self._loop, name="prumerge-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> bool:
        with self.lock:
            if self.pending > self.max_queue:
                return False
            self.pending += 1
        self.jobs.put_nowait(job)
        return True

    def waiting(self) -> int:
        return max(0, self.pending - 1)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue's length times the recent mean request time."""
        mean = sum(self.recent) / len(self.recent) if self.recent else 1.0
        return max(1, math.ceil(mean * max(1, self.pending)))

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            finally:
                with self.lock:
                    self.pending -= 1
                self.jobs.task_done()

    def _run(self, job: Job) -> None:
        job.started_at = time.perf_counter()
        request = job.request
        pipeline = self.pipelines[request.method or "default"]
        try:
            stream = pipeline.generate(request.images, request.prompt, sampling=request.sampling, stream=True)
            pieces = 0
            for piece in stream:
                if job.cancelled.is_set():
                    stream.close()
                    self.cancelled = (self.cancelled + [pieces])[-16:]
                    job.emit("cancelled")
                    return
                pieces += 1
                job.emit("delta", piece)
            job.emit("done", stream.result)
        except InputError as exc:
            job.emit("error", (400, str(exc)))
        except PruMergeError as exc:
            job.emit("error", (500, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own 500, never the worker's end
            job.emit("error", (500, f"{type(exc).__name__}: {exc}"))
        finally:
            self.recent = (self.recent + [time.perf_counter() - job.started_at])[-16:]


def create_app(artifact: str | Path, max_queue: int = 8, policy: api.ImagePolicy | None = None,
               model_name: str | None = None, provider: str = "cpu", expect_sha256: str | None = None):
    """The ASGI app serving ``artifact`` (its pipelines opened now, before the first request)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from ..runtime.pipeline import Pipeline

    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise InputError(f"--max-queue must be an integer >= 0, got {max_queue!r}")
    artifact = Path(artifact)
    policy = policy or api.ImagePolicy()
    default = Pipeline.from_artifacts(artifact, provider=provider, expect_sha256=expect_sha256)
    pipelines = {"default": default, default.method: default}
    if default.vision is not None and default.vision.manifest.baseline is not None and default.method != "none":
        pipelines["none"] = Pipeline.from_artifacts(artifact, provider=provider, method="none", verify=False)
    methods = tuple(m for m in pipelines if m != "default")
    model = model_name or artifact.resolve().name
    worker = Worker(pipelines, max_queue)

    def error(message: str, status: int, param: str | None = None, headers: dict | None = None):
        return JSONResponse(api.error_body(message, status, param), status_code=status, headers=headers)

    async def health(_request):
        return JSONResponse({"status": "ok", "model": model, "methods": list(methods),
                             "waiting": worker.waiting(), "max_queue": worker.max_queue,
                             "cancelled_generations": list(worker.cancelled)})

    async def models(_request):
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                                         "owned_by": "prumerge", "prumerge": {"methods": list(methods)}}]})

    async def chat(request):
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            return error("the request body is not valid JSON", 400)
        try:
            if isinstance(body, dict) and body.get("model") not in (None, model):
                raise api.RequestError(f"model {body.get('model')!r} is not served here; this server serves {model!r}",
                                       status=404, param="model")
            parsed = api.parse_request(body, policy, default.marker, methods)
        except api.RequestError as exc:
            return error(str(exc), exc.status, exc.param)
        job = Job(parsed, asyncio.get_running_loop())
        if not worker.submit(job):
            wait = worker.retry_after()
            return error(f"the server is busy ({worker.max_queue} requests waiting); retry in about {wait} s", 429,
                         headers={"Retry-After": str(wait)})
        request_id = api.new_id()
        if parsed.stream:
            return StreamingResponse(_events(job, request_id, model), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "done":
                    return JSONResponse(api.completion(request_id, model, value, _queue_ms(job)))
                if kind == "error":
                    return error(value[1], value[0])
        except asyncio.CancelledError:  # the client left: the worker drops or stops the job
            job.cancelled.set()
            raise

    routes = [Route(HEALTH_PATH, health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat, methods=["POST"])]
    app = Starlette(routes=routes)
    app.state.worker, app.state.pipelines = worker, pipelines
    return app


def _queue_ms(job: Job) -> float | None:
    return None if job.started_at is None else (job.started_at - job.queued_at) * 1e3


async def _events(job: Job, request_id: str, model: str):
    """Server-sent events in OpenAI's chunk format: the role, the text pieces, the finish reason (and usage when
    asked), then ``[DONE]``. A client that disconnects cancels the generator: the job is marked cancelled."""
    def line(data) -> str:
        return f"data: {json.dumps(data)}\n\n"

    try:
        yield line(api.chunk(request_id, model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield line(api.chunk(request_id, model, {"content": value}))
            elif kind == "done":
                usage = api.usage(value, _queue_ms(job))
                yield line(api.chunk(request_id, model, {}, api.FINISH_REASONS.get(value.stop_reason, "stop"),
                                     usage_=None if job.request.include_usage else usage))
                if job.request.include_usage:
                    yield line(api.chunk(request_id, model, {}, usage_=usage, choices=False))
                break
            elif kind == "error":
                yield line(api.error_body(value[1], value[0]))
                break
            else:
                break
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away mid-stream (the generator is closed or cancelled)
        job.cancelled.set()


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run the server until interrupted (uvicorn; one process, one worker thread)."""
    import uvicorn

    app = create_app(artifact, **options)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
