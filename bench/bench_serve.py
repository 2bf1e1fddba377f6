"""What `prumerge-export serve` costs on top of the pipeline, side by side in one run on the same artifact.

1. **Overhead per request**: the same greedy question about the same PNG bytes asked N times (a) directly of a
   `Pipeline` in this process (it decodes the PNG, as `run` decodes a file) and
   (b) through the server with the `openai` client (streamed, so the client sees its first token); the server's
   overhead is the client-observed TTFT minus the pipeline's own TTFT that the server reports for the same request
   (`usage.prumerge.timings_ms.ttft`), p50 and p90, once through the `openai` package (what an app sees, its SSE
   parsing and models included) and once through a bare `http.client` connection (the server's own share). Both sides answer the same image and prompt, and their texts are
   compared (they must be identical).
2. **Throughput**: 4 concurrent clients, Q questions each, against the same `Pipeline` called serially for the same
   4 x Q questions: requests per second, and the ratio.

The server listens on 127.0.0.1 (a free port) and is stopped by its PID at the end.

Usage: python bench/bench_serve.py ARTIFACT [--requests 20] [--per-client 5] [--max-tokens 8] [--json OUT]
"""

from __future__ import annotations

import argparse
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

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_overhead(port: int, model: str, messages: list, max_tokens: int) -> float:
    """Client-observed TTFT minus the pipeline's own TTFT for one streamed request over a bare ``http.client``
    connection (reading server-sent events line by line): what the server adds, without an SDK's parsing."""
    import http.client

    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    first, ttft = None, None
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
            first = (time.perf_counter() - start) * 1e3
        if event.get("usage"):
            ttft = event["usage"]["prumerge"]["timings_ms"]["ttft"]
    connection.close()
    return first - ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import openai

    from prumerge.runtime.pipeline import Pipeline
    from prumerge.shapes_qa import scenes

    shown = list(scenes(4, 3, split="heldout"))
    images = [s.image for s in shown]
    question = shown[0].questions[0].text
    pngs, files = [], []
    for image in images:  # both sides get the same PNG bytes: the pipeline decodes them as the server does
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append(buffer.getvalue())
        pngs.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())

    pipeline = Pipeline.from_artifacts(args.artifact)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "prumerge.cli", "serve", str(args.artifact), "--port", str(port),
                               "--max-queue", "16"], start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id

        def message(i):
            return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": pngs[i % len(pngs)]}},
                                                 {"type": "text", "text": question}]}]

        direct, served, overhead, same = [], [], [], 0
        client.chat.completions.create(messages=message(0), max_tokens=2, model=model)  # warm both sides
        pipeline.generate(files[0], "<image>\n" + question, max_new_tokens=2)
        for i in range(args.requests):
            result = pipeline.generate(files[i % 4], "<image>\n" + question, max_new_tokens=args.max_tokens)
            direct.append(result.timings_ms["ttft"])
            start = time.perf_counter()
            first, text, usage = None, [], None
            stream = client.chat.completions.create(messages=message(i), max_tokens=args.max_tokens, stream=True,
                                                    model=model, stream_options={"include_usage": True})
            for event in stream:
                for choice in event.choices:
                    if choice.delta.content and first is None:
                        first = (time.perf_counter() - start) * 1e3
                    text.append(choice.delta.content or "")
                if event.usage is not None:
                    usage = event.usage.model_dump()
            pipeline_ttft = usage["prumerge"]["timings_ms"]["ttft"]
            served.append(first)
            overhead.append(first - pipeline_ttft)
            same += "".join(text) == result.text
        raw = []  # the same through a bare HTTP client (http.client, no SSE parser): the server's own share
        for i in range(args.requests):
            raw.append(raw_overhead(port, model, message(i), args.max_tokens))
        report = {"requests": args.requests, "identical_answers": same,
                  "server_overhead_bare_client_ms_p50": float(np.percentile(raw, 50)),
                  "server_overhead_bare_client_ms_p90": float(np.percentile(raw, 90)),
                  "pipeline_ttft_ms_p50": float(np.percentile(direct, 50)),
                  "client_ttft_ms_p50": float(np.percentile(served, 50)),
                  "server_overhead_ms_p50": float(np.percentile(overhead, 50)),
                  "server_overhead_ms_p90": float(np.percentile(overhead, 90))}

        total = 4 * args.per_client
        start = time.perf_counter()
        for i in range(total):
            pipeline.generate(files[i % 4], "<image>\n" + question, max_new_tokens=args.max_tokens)
        serial_rps = total / (time.perf_counter() - start)
        errors = []

        def client_loop(c):
            own = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
            for j in range(args.per_client):
                try:
                    own.chat.completions.create(messages=message(c + j), max_tokens=args.max_tokens, model=model)
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(str(exc))

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(4)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served_rps = total / (time.perf_counter() - start)
        report.update(serial_requests_per_s=serial_rps, concurrent4_requests_per_s=served_rps,
                      throughput_ratio=served_rps / serial_rps, errors=len(errors))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
