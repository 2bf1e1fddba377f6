"""OpenAI's chat-completions request and response shapes, translated to and from the runtime's own terms.

Why a module of its own: the shapes are OpenAI's (every client — the ``openai`` package, LangChain, web UIs —
speaks them) while the runtime speaks ``Pipeline.generate(images, prompt, sampling)``; keeping the translation
here leaves the server (``serve.app``) to queueing and transport, and makes every rule testable without a socket.

What a request may carry, and how it maps:

* ``messages``: one ``user`` message (this runtime's prompt format renders one user turn, as ``run`` does). Its
  ``content`` is a string, or parts in order — ``{"type": "text", "text": ...}`` and ``{"type": "image_url",
  "image_url": {"url": ...}}`` — joined with newlines, each image part becoming the artifact's image marker where it
  stands (``[image, "What is it?"]`` is ``run --prompt "<image>\\nWhat is it?"``). System and earlier turns are
  refused with a 400 rather than silently dropped.
* images: ``data:`` URLs (base64) always; a local path (``file://`` or plain) only inside ``--images-dir``; ``http(s)``
  only with ``--allow-remote-images`` (an offline device, and no fetching of arbitrary URLs for a caller).
* sampling: ``max_completion_tokens`` / ``max_tokens`` -> ``max_new_tokens``; ``temperature``, ``top_p``, ``stop``
  (a string or a list), ``seed``; ``n`` other than 1 and ``logprobs`` / tools are refused in one line.
* ``prumerge`` (extra body): ``{"method": "none"}`` picks the unreduced baseline graph of a ``--baseline`` artifact.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import InputError
from ..runtime.pipeline import GenerationResult, SamplingParams

DEFAULT_MAX_TOKENS = 256
MAX_IMAGE_BYTES = 20 << 20  # a data: URL or a fetched image larger than this is refused before it is decoded
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context": "length"}
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "response_format",
               "audio", "modalities", "prediction")


class RequestError(InputError):
    """A request the server answers with an OpenAI error body and this HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclasses.dataclass
class ImagePolicy:
    """Where images may come from (the ``serve`` flags)."""

    images_dir: Path | None = None
    allow_remote: bool = False
    max_bytes: int = MAX_IMAGE_BYTES
    fetch_timeout_s: float = 10.0


@dataclasses.dataclass
class ChatRequest:
    """A request as the runtime takes it."""

    prompt: str
    images: list  # bytes or paths, in prompt order
    sampling: SamplingParams
    stream: bool
    method: str | None  # None: the artifact's own graph
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage


def parse_request(body, policy: ImagePolicy, marker: str, methods: tuple) -> ChatRequest:
    """Check and translate one request body; every problem is one :class:`RequestError` naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"{name} is not supported by this server", param=name)
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1: one answer per request", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"messages[{i}] must be an object with a role (user)", param="messages")
    if len(messages) != 1 or messages[0]["role"] != "user":
        roles = ", ".join(m["role"] for m in messages)
        raise RequestError(f"this server answers one user message per request (its prompt format renders one user "
                           f"turn, as `run` does); got {roles}", param="messages")
    prompt, images = _content(messages[0].get("content"), policy, marker)
    sampling = _sampling(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    extra = body.get("prumerge") or {}
    if not isinstance(extra, dict) or set(extra) - {"method"}:
        raise RequestError('prumerge must be an object with at most a "method"', param="prumerge")
    method = extra.get("method")
    if method is not None and method not in methods:
        raise RequestError(f"prumerge.method {method!r} is not served here; choose one of: {', '.join(methods)}",
                           param="prumerge.method")
    return ChatRequest(prompt, images, sampling, stream, method, bool(options.get("include_usage")))


def _content(content, policy: ImagePolicy, marker: str) -> tuple[str, list]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise RequestError("messages[0].content must be a string or a non-empty list of parts", param="messages")
    pieces, images = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise RequestError(f"messages[0].content[{i}].image_url.url must be a string", param="messages")
            images.append(fetch_image(url, policy))
            pieces.append(marker)
        else:
            raise RequestError(f"messages[0].content[{i}] must be a text or image_url part", param="messages")
    return "\n".join(pieces), images


def fetch_image(url: str, policy: ImagePolicy):
    """The image's bytes (``data:`` and, when allowed, ``http(s)``) or its path (inside ``images_dir``)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError("a data: URL image must be base64 (data:image/png;base64,...)", param="messages")
        if len(payload) > policy.max_bytes * 4 // 3 + 4:
            raise RequestError(f"the image is over {policy.max_bytes >> 20} MiB", status=413, param="messages")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("the data: URL is not valid base64", param="messages") from None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        if not policy.allow_remote:
            raise RequestError("remote image URLs are refused by this server (start it with --allow-remote-images); "
                               "send the image as a base64 data: URL", param="messages")
        return _download(url, policy)
    if parsed.scheme in ("file", ""):
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
        if policy.images_dir is None:
            raise RequestError("local image paths are refused (start the server with --images-dir DIR to allow a "
                               "folder); send the image as a base64 data: URL", param="messages")
        root = policy.images_dir.resolve()
        try:
            resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
        except (OSError, ValueError):
            raise RequestError("the image path cannot be read", param="messages") from None
        if root not in resolved.parents or not resolved.is_file():
            raise RequestError(f"image {str(path)[:200]!r} is not a file inside the server's --images-dir", param="messages")
        return resolved
    raise RequestError(f"image URL scheme {parsed.scheme!r} is not supported (data:, or a path under --images-dir)",
                       param="messages")


def _download(url: str, policy: ImagePolicy) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=policy.fetch_timeout_s) as response:  # noqa: S310 - opted in
            data = response.read(policy.max_bytes + 1)
    except OSError as exc:
        raise RequestError(f"the image URL could not be fetched ({exc})", param="messages") from None
    if len(data) > policy.max_bytes:
        raise RequestError(f"the image is over {policy.max_bytes >> 20} MiB", status=413, param="messages")
    return data


def _sampling(body: dict) -> SamplingParams:
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    limit = DEFAULT_MAX_TOKENS if limit is None else limit
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4:
        raise RequestError("stop must be a string or a list of at most 4 strings", param="stop")
    temperature = body.get("temperature", 0.0)
    top_p = body.get("top_p", 1.0)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{name} must be a number", param=name)
    if temperature > 2:
        raise RequestError("temperature must be in 0..2", param="temperature")
    try:
        return SamplingParams(limit, float(temperature), float(top_p), tuple(stop), body.get("seed"))
    except InputError as exc:
        raise RequestError(str(exc).replace("max_new_tokens", "max_tokens")) from None


# ------------------------------------------------------------------------------------------------ responses
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(result: GenerationResult, queue_ms: float | None = None) -> dict:
    """OpenAI's usage, plus what the reducer did: the visual tokens kept per image, the method, and the pipeline's
    timings (the same ones ``run --json`` reports; ``server_queue`` is the wait before this request ran)."""
    timings = dict(result.timings_ms)
    if queue_ms is not None:
        timings["server_queue"] = queue_ms
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
            "total_tokens": result.prompt_tokens + result.generated_tokens,
            "prumerge": {"visual_tokens": list(result.visual_tokens), "method": result.method,
                         "stop_reason": result.stop_reason, "timings_ms": timings}}


def completion(request_id: str, model: str, result: GenerationResult, queue_ms: float | None) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": FINISH_REASONS.get(result.stop_reason, "stop"), "logprobs": None}],
            "usage": usage(result, queue_ms)}


def chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None, usage_: dict | None = None,
          choices: bool = True) -> dict:
    out = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}] if choices else []}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
