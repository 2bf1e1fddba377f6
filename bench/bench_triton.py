"""Load benchmark of the Triton repository on a real local tritonserver (CPU, 127.0.0.1 only, bounded).

Two repositories from the same artifact, side by side in one run: the vision model with dynamic batching
(``--max-batch 8``) and without (``--max-batch 1``). For each: ``--requests`` vision requests (one image each) from
``--concurrency`` clients: images/s, p50/p99 latency, and the batch sizes Triton formed; then end-to-end answers
(image + prompt -> streamed text through the BLS model) with the batching repository: answers/s and latency.
Every request is counted: sent, answered, failed. Usage:
    python bench/bench_triton.py [--artifact artifacts/demo] [--requests 64] [--concurrency 8] [--answers 16]
The artifact defaults to the demo's (``prumerge-export demo`` builds it).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=HERE.parent / "artifacts" / "demo")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--answers", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    import numpy as np
    import tritonclient.http as http
    from tritonlocal import LocalTriton, available

    from prumerge.runtime import VisionSession
    from prumerge.runtime.preprocess import preprocess_batch
    from prumerge.samples import synthetic_images
    from prumerge.triton.repository import TritonOptions, write_repository

    if available():
        sys.exit(available())
    if not (args.artifact / "manifest.json").is_file():
        sys.exit(f"{args.artifact} is not an artifact: run `prumerge-export demo --out {args.artifact}` first")
    if not 1 <= args.concurrency <= 32 or not 1 <= args.requests <= 1024:
        sys.exit("keep the load bounded: --concurrency 1..32, --requests 1..1024")
    session = VisionSession.open(args.artifact)
    images = synthetic_images(args.requests, seed=11)
    feeds = [preprocess_batch([img], session.preprocess) for img in images]
    work = Path(tempfile.mkdtemp(prefix="prumerge-triton-bench-"))
    print(f"artifact {args.artifact} ({session.graph['method']}, {session.image_size} px); {args.requests} vision requests "
          f"from {args.concurrency} clients; tritonserver on 127.0.0.1, CPU")

    def vision_load(server) -> dict:
        def one(feed):
            client = http.InferenceServerClient(server.http)
            request = http.InferInput("pixel_values", list(feed.shape), "FP32")
            request.set_data_from_numpy(feed)
            start = time.perf_counter()
            try:
                client.infer("prumerge_vision", [request], timeout=120)
                return time.perf_counter() - start, True
            except Exception:  # counted, not raised: the bench reports lost requests
                return time.perf_counter() - start, False

        one(feeds[0])  # warm-up (not counted)
        before = server.stats("prumerge_vision")["model_stats"][0]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, feeds))
        wall = time.perf_counter() - start
        after = server.stats("prumerge_vision")["model_stats"][0]
        latencies = sorted(r[0] * 1e3 for r in results)
        sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
        for b in before["batch_stats"]:
            sizes[int(b["batch_size"])] -= int(b["compute_infer"]["count"])
        return {"ok": sum(r[1] for r in results), "failed": sum(not r[1] for r in results), "images_per_s": len(results) / wall,
                "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                "batches": {k: v for k, v in sorted(sizes.items()) if v}}

    rows = {}
    for label, max_batch in (("dynamic batching (max 8)", 8), ("max_batch 1", 1)):
        repo = work / f"repo-{max_batch}"
        write_repository(args.artifact, repo, TritonOptions(max_batch=max_batch, max_queue_delay_us=20_000))
        with LocalTriton(repo / "models", work / f"server-{max_batch}") as server:
            rows[label] = vision_load(server)
            if max_batch == 8:
                rows["answers"] = answer_load(server, images[: args.answers], args)
    for label in ("dynamic batching (max 8)", "max_batch 1"):
        r = rows[label]
        print(f"vision, {label:<24}: {r['images_per_s']:6.2f} images/s, p50 {r['p50']:7.1f} ms, p99 {r['p99']:7.1f} ms; "
              f"answered {r['ok']}/{r['ok'] + r['failed']}, batches formed {r['batches']}")
    ratio = rows["dynamic batching (max 8)"]["images_per_s"] / rows["max_batch 1"]["images_per_s"]
    print(f"dynamic batching vs max_batch 1: {ratio:.2f}x images/s")
    a = rows["answers"]
    print(f"end to end (image + prompt -> {args.max_new_tokens} streamed tokens, BLS): {a['answers_per_s']:.2f} answers/s, "
          f"p50 {a['p50']:.0f} ms, p99 {a['p99']:.0f} ms; answered {a['ok']}/{a['ok'] + a['failed']}")
    if any(r["failed"] for r in rows.values()):
        sys.exit("requests were lost")


def answer_load(server, images, args) -> dict:
    import queue

    import numpy as np
    import tritonclient.grpc as grpc

    def one(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        responses: queue.Queue = queue.Queue()
        client = grpc.InferenceServerClient(server.grpc)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        inputs = [grpc.InferInput("IMAGE", [1], "BYTES"), grpc.InferInput("PROMPT", [1], "BYTES"),
                  grpc.InferInput("MAX_NEW_TOKENS", [1], "INT32")]
        inputs[0].set_data_from_numpy(np.array([buffer.getvalue()], dtype=object))
        inputs[1].set_data_from_numpy(np.array([b"<image> What is in this picture?"], dtype=object))
        inputs[2].set_data_from_numpy(np.array([args.max_new_tokens], dtype=np.int32))
        start = time.perf_counter()
        client.async_stream_infer("prumerge", inputs, enable_empty_final_response=True)
        ok = False
        try:
            while True:
                result, error = responses.get(timeout=300)
                if error is not None:
                    break
                if result.as_numpy("RESULT") is not None and result.as_numpy("RESULT")[0]:
                    ok = True
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
        finally:
            client.stop_stream()
            client.close()
        return time.perf_counter() - start, ok

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, images))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] * 1e3 for r in results)
    return {"ok": sum(r[1] for r in results), "failed": sum(not r[1] for r in results), "answers_per_s": len(results) / wall,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


if __name__ == "__main__":
    main()
