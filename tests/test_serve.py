"""``prumerge-export serve`` against the real server with the real ``openai`` client package (not a mock): answers
equal to ``run``'s greedy ones, streamed and not; concurrent clients; a client that leaves stops its generation;
429 with Retry-After past the queue; bad requests are OpenAI's error shape with a 4xx and disturb nobody.

The server listens on 127.0.0.1 only, on a free port, and every server started here is stopped by its PID."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client package is in the test extra")

from prumerge.samples import synthetic_images  # noqa: E402
from prumerge.serve import openai_api as api  # noqa: E402


@pytest.fixture(scope="module")
def artifact(artifact_factory):
    return artifact_factory("llava", "prumerge", "padded", llm_precision="fp32", baseline=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact: Path, *flags: str) -> None:
        self.port = _free_port()
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"prumerge-serve-{self.port}.log", "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "prumerge.cli", "serve", str(artifact), "--host",
                                         "127.0.0.1", "--port", str(self.port), *flags],
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"the server exited: {self.log.read()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health in 120 s")

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # by its PID (its own session: nothing else)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(20)
        self.log.close()


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    images = tmp_path_factory.mktemp("served-images")
    synthetic_images(1, seed=3)[0].save(images / "photo.png")
    running = Server(artifact, "--max-queue", "2", "--images-dir", str(images))
    running.images = images
    yield running
    running.stop()


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _message(image, text: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                         {"type": "text", "text": text}]}]


QUESTION = "What is in the picture?"


@pytest.mark.slow
def test_answers_equal_runs_greedy_answer_streamed_and_not(server, artifact):
    from prumerge.runtime.pipeline import Pipeline

    image = synthetic_images(1, seed=3)[0]
    expected = Pipeline.from_artifacts(artifact).generate(image, "<image>\n" + QUESTION, max_new_tokens=12)
    client = server.client()
    got = client.chat.completions.create(messages=_message(image, QUESTION), max_tokens=12,
                                         model=client.models.list().data[0].id)
    assert got.choices[0].message.content == expected.text
    assert got.choices[0].finish_reason == ("length" if expected.stop_reason == "max_new_tokens" else "stop")
    usage = got.usage.model_dump()
    assert usage["prompt_tokens"] == expected.prompt_tokens and usage["completion_tokens"] == expected.generated_tokens
    assert usage["prumerge"]["visual_tokens"] == expected.visual_tokens and usage["prumerge"]["method"] == "prumerge"
    assert {"ttft", "prefill", "vision", "server_queue"} <= set(usage["prumerge"]["timings_ms"])

    pieces, finish = [], None
    for event in client.chat.completions.create(messages=_message(image, QUESTION), max_tokens=12, stream=True,
                                                model=client.models.list().data[0].id):
        for choice in event.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected.text and finish in ("length", "stop")

    # the baseline graph by request, and the same image by path under --images-dir
    none = Pipeline.from_artifacts(artifact, method="none").generate(image, "<image>\n" + QUESTION, max_new_tokens=6)
    got = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(server.images / "photo.png")}}, {"type": "text", "text": QUESTION}]}],
        max_tokens=6, model=client.models.list().data[0].id, extra_body={"prumerge": {"method": "none"}})
    assert got.choices[0].message.content == none.text and got.usage.model_dump()["prumerge"]["method"] == "none"


def test_the_run_command_and_the_server_agree_byte_for_byte(server, artifact, tmp_path):
    image = synthetic_images(1, seed=5)[0]
    image.save(tmp_path / "x.png")
    ran = subprocess.run([sys.executable, "-m", "prumerge.cli", "run", str(artifact), "--image", str(tmp_path / "x.png"),
                          "--prompt", "<image>\nDescribe it.", "--max-new-tokens", "8", "--json"],
                         capture_output=True, text=True, check=True)
    expected = json.loads(ran.stdout)["text"]
    client = server.client()
    got = client.chat.completions.create(messages=_message(image, "Describe it."), max_tokens=8,
                                         model=client.models.list().data[0].id)
    assert got.choices[0].message.content == expected


def test_models_and_health(server):
    models = server.client().models.list().data
    assert len(models) == 1 and models[0].owned_by == "prumerge"
    with urllib.request.urlopen(server.base + "/health", timeout=5) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and set(health["methods"]) == {"prumerge", "none"}


@pytest.mark.parametrize("change, status, message", [
    (lambda r: r.update(messages=[{"role": "user", "content": [{"type": "video", "x": 1}]}]), 400, "text or image_url part"),
    (lambda r: r.update(messages=[]), 400, "messages must be a non-empty list"),
    (lambda r: r.update(messages=[{"role": "system", "content": "be brief"}, *r["messages"]]), 400, "one user message"),
    (lambda r: r["messages"][0]["content"][0]["image_url"].update(url="https://example.com/a.png"), 400, "remote image URLs are refused"),
    (lambda r: r["messages"][0]["content"][0]["image_url"].update(url="/etc/passwd"), 400, "inside the server's --images-dir"),
    (lambda r: r["messages"][0]["content"][0]["image_url"].update(url="data:image/png;base64,@@@"), 400, "not valid base64"),
    (lambda r: r["messages"][0]["content"][0]["image_url"].update(url="data:image/png;base64,aGVsbG8="), 400, "image"),
    (lambda r: r.update(prumerge={"method": "visionzip"}), 400, "is not served here"),
    (lambda r: r.update(n=2), 400, "n must be 1"),
    (lambda r: r.update(max_tokens=0), 400, "max_tokens must be"),
    (lambda r: r.update(temperature=float("nan")), 400, "temperature"),
    (lambda r: r["messages"][0]["content"].append({"type": "text", "text": "word " * 20000}), 400, "context"),
    (lambda r: r.update(model="another-model"), 404, "is not served here"),
])
def test_a_bad_request_is_openais_error_shape_and_disturbs_nobody(server, change, status, message):
    image = synthetic_images(1, seed=3)[0]
    body = {"model": server.client().models.list().data[0].id, "messages": _message(image, QUESTION), "max_tokens": 4}
    change(body)
    request = urllib.request.Request(server.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == status, exc.read()
        error = json.loads(exc.read())["error"]
        assert message in error["message"] and error["type"].endswith("_error"), error
    ok = server.client().chat.completions.create(messages=_message(image, QUESTION), max_tokens=2,
                                                 model=server.client().models.list().data[0].id)
    assert ok.choices[0].message.content is not None  # the server still answers


def test_a_malformed_body_is_a_400_not_a_traceback(server):
    for data in (b"{not json", b"[" * 100000 + b"]" * 100000, b"[]"):
        request = urllib.request.Request(server.base + "/v1/chat/completions", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == 400 and "error" in json.loads(info.value.read())


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_answer(server, artifact):
    from prumerge.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_artifacts(artifact)
    images = synthetic_images(3, seed=11)
    expected = [pipeline.generate(im, "<image>\n" + QUESTION, max_new_tokens=6).text for im in images]
    model = server.client().models.list().data[0].id
    got, errors = [None] * 3, []

    def ask(i):
        try:
            got[i] = server.client().chat.completions.create(messages=_message(images[i], QUESTION), max_tokens=6,
                                                             model=model).choices[0].message.content
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == expected


@pytest.mark.slow
def test_past_the_queue_429_with_retry_after_and_a_leaving_client_stops_its_generation(artifact):
    """--max-queue 0: one request runs, none waits. A long streamed answer holds the worker; a second request is
    refused 429 with Retry-After; the first client leaves mid-stream, its generation stops before its token limit
    (the server counts the pieces it had made), and the next request is answered."""
    from prumerge.runtime.pipeline import Pipeline

    image = synthetic_images(1, seed=6)[0]
    asked = 1600
    solo = Pipeline.from_artifacts(artifact).generate(image, "<image>\n" + QUESTION, max_new_tokens=asked)
    assert solo.stop_reason == "max_new_tokens", "the check needs an answer that runs to its token limit"
    server = Server(artifact, "--max-queue", "0")
    try:
        client = server.client()
        model = client.models.list().data[0].id
        stream = client.chat.completions.create(messages=_message(image, QUESTION), max_tokens=asked, stream=True,
                                                model=model)
        next(iter(stream))  # the generation is running
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(messages=_message(image, QUESTION), max_tokens=2, model=model)
        assert int(info.value.response.headers["Retry-After"]) >= 1
        stream.close()  # the client leaves mid-stream
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                client.chat.completions.create(messages=_message(image, QUESTION), max_tokens=2, model=model)
                break
            except openai.RateLimitError:
                time.sleep(0.05)
        else:
            raise AssertionError("the worker never came free after the client left")
        with urllib.request.urlopen(server.base + "/health", timeout=5) as r:
            (pieces,) = json.loads(r.read())["cancelled_generations"]
        assert pieces < asked  # stopped by the client's leaving, not by running out of tokens
        assert server.process.poll() is None
    finally:
        server.stop()


def test_request_translation_rules():
    policy = api.ImagePolicy()
    request = api.parse_request({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}, {"type": "text", "text": "Hi?"}]}],
        "max_completion_tokens": 7, "stop": "x", "seed": 3}, policy, "<image>", ("prumerge",))
    assert request.prompt == "<image>\nHi?" and request.images == [b"hi"]
    assert request.sampling.max_new_tokens == 7 and request.sampling.stop == ("x",) and request.sampling.seed == 3
    assert api.parse_request({"messages": [{"role": "user", "content": "plain"}]}, policy, "<image>", ()).prompt == "plain"
    with pytest.raises(api.RequestError, match="refused"):
        api.fetch_image("file:///etc/hosts", policy)


def test_generate_refuses_sampling_given_twice(artifact):
    """The server passes one SamplingParams; loose keywords beside it used to be ignored silently."""
    from prumerge.errors import ConfigError
    from prumerge.runtime.pipeline import Pipeline, SamplingParams

    pipeline = Pipeline.from_artifacts(artifact)
    image = synthetic_images(1, seed=3)[0]
    with pytest.raises(ConfigError, match="not both"):
        pipeline.generate(image, "<image> hi", max_new_tokens=3, sampling=SamplingParams(max_new_tokens=2))
    assert pipeline.generate(image, "<image> hi", sampling=SamplingParams(max_new_tokens=2)).generated_tokens <= 2
