"""ViT-L/14-336 + PruMerge + LLaVA-1.5 projector: onnxruntime CPU vs torch eager, one run, same inputs.

Prints export time, file sizes, latency of each runtime (median over runs, batch 1) with their ratio (goal:
onnxruntime >= 1.3x faster) and each runtime's peak RSS (each measured in its own child process so the numbers
do not mix). Random weights, last-layer q/k sharpened (see common.py).
Usage: python bench/bench_export.py [--runs N] [--method prumerge|prumerge+] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_encoder(method: str):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from common import VIT_L_336, sharpen, vit_l_tower
    from prumerge.model.encoder import PruMergeEncoder
    from prumerge.reduce import ReducerConfig

    tower = vit_l_tower()
    sharpen(tower, 6.0)
    llava = LlavaConfig(vision_config=CLIPVisionConfig(**VIT_L_336), text_config=LlamaConfig(hidden_size=4096))
    torch.manual_seed(1)
    projector = LlavaMultiModalProjector(llava).eval()
    return PruMergeEncoder(tower, ReducerConfig(method=method), projector=projector).eval()


def child(kind: str, workdir: Path, runs: int, method: str) -> None:
    """Run one runtime alone and print latency + peak RSS as JSON."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from common import timed

    from prumerge.profile.stats import peak_rss_mb

    pixels = np.load(workdir / "pixels.npy")
    if kind == "torch":
        import torch

        encoder = make_encoder(method)
        x = torch.from_numpy(pixels)
        with torch.inference_mode():
            out = encoder(x)
            latency = timed(lambda: encoder(x), runs)
        counts = out.num_tokens.tolist()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(workdir / "vision.onnx"), providers=["CPUExecutionProvider"])
        out = session.run(None, {"pixel_values": pixels})
        latency = timed(lambda: session.run(None, {"pixel_values": pixels}), runs)
        counts = out[1].tolist()
        batch8 = np.repeat(pixels, 8, axis=0)
        throughput = {"images_per_s_batch1": 1 / latency,
                      "images_per_s_batch8": 8 / timed(lambda: session.run(None, {"pixel_values": batch8}), max(2, runs // 2))}
    print(json.dumps({"latency_s": latency, "peak_rss_mb": peak_rss_mb(), "num_tokens": counts,
                      **(throughput if kind == "ort" else {})}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--method", default="prumerge")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=["torch", "ort"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prumerge-bench-"))
    if args.child:
        return child(args.child, workdir, args.runs, args.method)

    import numpy as np
    import torch

    import shutil

    import onnxruntime as ort

    from prumerge.export.checks import check_onnx
    from prumerge.export.graph import export_onnx, simplify

    encoder = make_encoder(args.method)
    start = time.perf_counter()
    export_onnx(encoder, workdir / "vision.onnx", "padded", batch_max=8)
    export_s = time.perf_counter() - start
    check_onnx(workdir / "vision.onnx")
    del encoder
    pixels = np.random.default_rng(0).normal(size=(1, 3, 336, 336)).astype(np.float32)
    np.save(workdir / "pixels.npy", pixels)
    # onnxslim, as the build runs it: node counts, and outputs of the exporter's graph vs the simplified one
    plain = workdir / "plain"
    plain.mkdir(exist_ok=True)
    for part in workdir.glob("vision.onnx*"):
        shutil.copy(part, plain / part.name)
    slim = simplify(workdir / "vision.onnx")
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})
               for p in (plain / "vision.onnx", workdir / "vision.onnx")]
    slim_diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(*outputs))
    shutil.rmtree(plain)
    sizes = {p.name: p.stat().st_size / 1e6 for p in sorted(workdir.iterdir()) if p.name.startswith("vision")}

    results = {}
    for kind in ("torch", "ort"):
        cmd = [sys.executable, __file__, "--child", kind, "--workdir", str(workdir), "--runs", str(args.runs), "--method", args.method]
        results[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    print(f"ViT-L/14-336 + {args.method} + LLaVA-1.5 projector (1024->4096->4096), random weights; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch 1, median of {args.runs} runs")
    print(f"export (dynamo, opset 18): {export_s:.1f} s; files: " + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items()))
    print(f"onnxslim: {slim.get('nodes_before')} -> {slim.get('nodes_after')} nodes; outputs max |diff| vs the exporter's "
          f"graph {slim_diff:.1e}" + (" (bit-identical)" if slim_diff == 0 else ""))
    for kind, label in (("torch", "torch eager"), ("ort", "onnxruntime CPU")):
        r = results[kind]
        print(f"{label:<16} {r['latency_s'] * 1e3:8.1f} ms   peak RSS {r['peak_rss_mb']:7.0f} MB   tokens {r['num_tokens']}")
    ort_result = results["ort"]
    print(f"onnxruntime CPU throughput: {ort_result['images_per_s_batch1']:.2f} images/s at batch 1, "
          f"{ort_result['images_per_s_batch8']:.2f} at batch 8")
    ratio = results["torch"]["latency_s"] / results["ort"]["latency_s"]
    same = results["torch"]["num_tokens"] == results["ort"]["num_tokens"]
    print(f"onnxruntime speed-up over torch eager: {ratio:.2f}x (goal >= 1.3x); same token counts: {same}")


if __name__ == "__main__":
    main()
