"""Load benchmark of the Triton repository on a real local tritonserver (CPU, 127.0.0.1 only, bounded).

Two repositories from the same artifact, side by side in one run: the vision model with dynamic batching
(``--max-batch 8``) and without (``--max-batch 1``). For each: ``--requests`` vision requests (one image each) from
``--concurrency`` clients: images/s, p50/p99 latency, and the batch sizes Triton formed. Then end to end through
the entry model (image + prompt -> streamed text) at 1, 4, 8, 16 clients (``--clients``), ``--llm-instances``
decoders: answers/s, tokens/s, TTFT and latency p50/p99, the vision model's inferences vs executions (batches
formed), and every answer compared with the same image's solo greedy answer. Every request is counted. Usage:
    python bench/bench_triton.py [--artifact artifacts/demo] [--requests 64] [--concurrency 8] [--answers 16]
The artifact defaults to the demo's (``prumerge-export demo`` builds it).
"""

from __future__ import annotations

import argparse
import io
import json
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
    parser.add_argument("--clients", default="1,4,8,16", help="end-to-end client counts (comma-separated)")
    parser.add_argument("--llm-instances", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if not all(1 <= c <= 32 for c in args.clients) or not 1 <= args.answers <= 64:
        sys.exit("keep the load bounded: --clients 1..32 each, --answers 1..64")
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
    print(f"artifact {args.artifact} ({session.graph.method}, {session.image_size} px); {args.requests} vision requests "
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

    for label in ("dynamic batching (max 8)", "max_batch 1"):
        r = rows[label]
        print(f"vision, {label:<24}: {r['images_per_s']:6.2f} images/s, p50 {r['p50']:7.1f} ms, p99 {r['p99']:7.1f} ms; "
              f"answered {r['ok']}/{r['ok'] + r['failed']}, batches formed {r['batches']}")
    ratio = rows["dynamic batching (max 8)"]["images_per_s"] / rows["max_batch 1"]["images_per_s"]
    print(f"dynamic batching vs max_batch 1: {ratio:.2f}x images/s")
    # end to end through the entry model: 1, 4, 8, 16 clients, each answer checked against its solo greedy answer
    from prumerge.runtime import Pipeline

    answer_images = images[: args.answers]
    pipeline = Pipeline.from_artifacts(args.artifact)
    solo = [pipeline.generate(image, PROMPT, max_new_tokens=args.max_new_tokens).token_ids for image in answer_images]
    repo = work / "repo-answers"
    write_repository(args.artifact, repo, TritonOptions(max_batch=8, max_queue_delay_us=20_000,
                                                        llm_instances=args.llm_instances, max_inflight=16))
    loads = []
    with LocalTriton(repo / "models", work / "server-answers") as server:
        answer_load(server, answer_images[:1], args, 1, solo[:1])  # warm-up (not counted)
        for clients in args.clients:
            loads.append(answer_load(server, answer_images, args, clients, solo))
    print(f"end to end (image + prompt -> {args.max_new_tokens} streamed tokens through the entry model), "
          f"{len(answer_images)} answers per row, {args.llm_instances} LLM instance(s):")
    print("| clients | answers/s | tokens/s | TTFT p50 / p99 (ms) | latency p50 / p99 (ms) | vision inferences / executions | answered | differ from solo |")
    print("|---:|---:|---:|---|---|---|---|---:|")
    for a in loads:
        print(f"| {a['clients']} | {a['answers_per_s']:.2f} | {a['tokens_per_s']:.1f} | {a['ttft_p50']:.0f} / {a['ttft_p99']:.0f} | "
              f"{a['p50']:.0f} / {a['p99']:.0f} | {a['vision_inferences']} / {a['vision_executions']} | "
              f"{a['ok']}/{a['answers']} | {a['differ_from_solo']} |")
    base = next((a for a in loads if a["clients"] == 1), None)
    for a in loads:
        if base and a is not base:
            print(f"{a['clients']} clients vs 1: {a['answers_per_s'] / base['answers_per_s']:.2f}x answers/s")
    if args.json:
        args.json.write_text(json.dumps({"vision": {k: rows[k] for k in rows}, "answers": loads}, indent=1))
    if any(r["failed"] for r in rows.values()) or any(a["lost"] or a["differ_from_solo"] for a in loads):
        sys.exit("requests were lost or answers differ from their solo answers")


def answer_load(server, images, args, clients: int, solo: list) -> dict:
    """``len(images)`` answers (image + prompt -> streamed tokens through the entry model) from ``clients`` clients:
    answers/s, TTFT and latency percentiles, tokens/s, the vision batches Triton formed meanwhile, and how many
    answers differ from their solo greedy answer (``solo``: token ids per image) or were lost."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpc

    def one(i):
        buffer = io.BytesIO()
        images[i].save(buffer, format="PNG")
        responses: queue.Queue = queue.Queue()
        client = grpc.InferenceServerClient(server.grpc)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        inputs = [grpc.InferInput("IMAGE", [1], "BYTES"), grpc.InferInput("PROMPT", [1], "BYTES"),
                  grpc.InferInput("MAX_NEW_TOKENS", [1], "INT32")]
        inputs[0].set_data_from_numpy(np.array([buffer.getvalue()], dtype=object))
        inputs[1].set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
        inputs[2].set_data_from_numpy(np.array([args.max_new_tokens], dtype=np.int32))
        start = time.perf_counter()
        client.async_stream_infer("prumerge", inputs, enable_empty_final_response=True)
        first, ids = None, None
        try:
            while True:
                result, error = responses.get(timeout=300)
                if error is not None:
                    break
                if first is None and result.as_numpy("TEXT") is not None and result.as_numpy("TEXT")[0]:
                    first = time.perf_counter() - start
                if result.as_numpy("RESULT") is not None and result.as_numpy("RESULT")[0]:
                    ids = json.loads(result.as_numpy("RESULT")[0])["token_ids"]
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
        finally:
            client.stop_stream()
            client.close()
        return time.perf_counter() - start, first, ids

    before = server.stats("prumerge_vision")["model_stats"][0]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(len(images))))
    wall = time.perf_counter() - start
    after = server.stats("prumerge_vision")["model_stats"][0]
    latencies = sorted(r[0] * 1e3 for r in results)
    ttfts = sorted(r[1] * 1e3 for r in results if r[1] is not None)
    answered = [r for r in results if r[2] is not None]
    return {"clients": clients, "answers": len(results), "ok": len(answered), "lost": len(results) - len(answered),
            "differ_from_solo": sum(r[2] != solo[i] for i, r in enumerate(results) if r[2] is not None),
            "answers_per_s": len(answered) / wall, "tokens_per_s": sum(len(r[2]) for r in answered) / wall,
            "ttft_p50": statistics.median(ttfts) if ttfts else None, "ttft_p99": _p99(ttfts),
            "p50": statistics.median(latencies), "p99": _p99(latencies),
            "vision_inferences": after["inference_count"] - before["inference_count"],
            "vision_executions": after["execution_count"] - before["execution_count"]}


def _p99(values: list):
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else None


PROMPT = "<image> What is in this picture?"


if __name__ == "__main__":
    main()
