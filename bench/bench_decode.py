"""Decode cost against context length: the KV cache grown by concatenation vs one preallocated buffer written in
place (GroupQueryAttention's shared past/present, as onnxruntime-genai runs these models), side by side in one
run on the same decoder, at 60, 620 (576 visual tokens + text) and 2000 context positions.

Usage: python bench/bench_decode.py [--artifact artifacts/demo] [--steps 32]   (the demo's SmolLM2-135M int4)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", type=Path, default=HERE.parent / "artifacts" / "demo")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import numpy as np

    from prumerge.runtime import Pipeline

    pipeline = Pipeline.from_artifacts(args.artifact, verify=False)
    decoder = pipeline.decoder
    print(f"{args.artifact}: {decoder.spec.model_type} {decoder.spec.precision}, {decoder.layers} layers; "
          f"{args.steps} greedy steps after the prompt, median of {args.repeats}")

    def ms_per_token(shared: bool, context: int) -> tuple[float, np.ndarray]:
        prompt = decoder.embed(list(np.arange(context) % 1000 + 100))
        decoder.spec.kv_share_buffer = shared
        times, last = [], None
        for _ in range(args.repeats):
            cache = decoder.start(capacity=context + args.steps + 1)
            logits, cache = decoder.step(prompt, cache)
            token = int(np.argmax(logits))
            start = time.perf_counter()
            for _ in range(args.steps):
                logits, cache = decoder.step(decoder.embed([token]), cache)
                token = int(np.argmax(logits))
            times.append((time.perf_counter() - start) * 1e3 / args.steps)
            last = logits
        return statistics.median(times), last

    supported = bool(decoder.spec.kv_share_buffer)
    for context in (60, 620, 2000):
        concat, a = ms_per_token(False, context)
        shared, b = ms_per_token(True, context)
        print(f"context {context:5d}: concatenated cache {concat:6.2f} ms/token, shared buffer {shared:6.2f} ms/token "
              f"= {concat / shared:4.2f}x; same logits: {bool(np.array_equal(a, b))}")
    decoder.spec.kv_share_buffer = supported


if __name__ == "__main__":
    main()
