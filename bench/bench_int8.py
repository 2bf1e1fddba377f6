"""INT8 vs FP32 vision graph (ViT-L/14-336 + PruMerge + projector) on onnxruntime CPU, one run.

Prints the fp32/int8 batch-1 latency ratio (goal: INT8 >= 1.5x faster) and the mean Jaccard of kept-token sets
between the two graphs (goal >= 0.9), on synthetic images, with attention sharpened as in the other benches
(random weights, last-layer q/k x6). Calibration and evaluation use different images.
Usage: python bench/bench_int8.py [--checkpoint DIR] [--calibration-images N] [--eval-images N] [--target cpu|tensorrt]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/prumerge-bench-pipeline/checkpoint"))
    parser.add_argument("--calibration-images", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=12)
    parser.add_argument("--method", default="prumerge")
    parser.add_argument("--target", default="cpu", choices=["cpu", "tensorrt"])
    parser.add_argument("--calibration-method", default="minmax")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from common import VIT_L_336

    from prumerge.calib.images import CalibrationSet
    from prumerge.calib.int8 import latency_ratio, quantize_vision, session_outputs
    from prumerge.export.validate import agreement
    from prumerge.demo import build_demo_checkpoint
    from prumerge.model.encoder import PruMergeEncoder
    from prumerge.export.graph import export_onnx
    from prumerge.artifact.preprocess_config import PreprocessConfig
    from prumerge.runtime.preprocess import preprocess_batch

    if not (args.checkpoint / "config.json").is_file():
        build_demo_checkpoint(args.checkpoint, vision={k: v for k, v in VIT_L_336.items() if k != "projection_dim"}, sharpen=6.0)
    encoder = PruMergeEncoder.from_pretrained(args.checkpoint, method=args.method)
    config = PreprocessConfig.from_processor_dict(None, encoder.image_size)
    calib = preprocess_batch(CalibrationSet.synthetic(args.calibration_images, seed=1).images, config)
    evaluate = preprocess_batch(CalibrationSet.synthetic(args.eval_images, seed=2).images, config)
    with tempfile.TemporaryDirectory(prefix="prumerge-int8-bench-") as scratch:
        fp32, int8 = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        export_onnx(encoder, fp32, "padded", batch_max=8)
        del encoder
        start = time.perf_counter()
        info = quantize_vision(fp32, int8, calib, args.calibration_method, target=args.target)
        quant_s = time.perf_counter() - start
        result = agreement(session_outputs(fp32, evaluate), session_outputs(int8, evaluate))
        ratio = latency_ratio(fp32, int8, evaluate, runs=5)
        sizes = {p.name: p.stat().st_size / 1e6 for p in Path(scratch).iterdir()}
    print(f"ViT-L/14-336 + {args.method} + projector, random weights (last-layer q/k x6); onnxruntime CPU, batch 1; "
          f"INT8 {info.format} ({args.target} activations: {info.activations}), {args.calibration_method} calibration "
          f"on {args.calibration_images} images, evaluated on {args.eval_images} others")
    print(f"quantisation {quant_s:.0f} s; files: " + ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(sizes.items())))
    print(f"latency fp32/int8 = {ratio:.2f}x (goal >= 1.5x)")
    print(f"kept-token agreement: mean Jaccard {result.mean_jaccard:.3f} (goal >= 0.9), min {result.min_jaccard:.3f}, "
          f"identical selections {100 * result.identical_selection:.0f}%, mean |count diff| {result.mean_count_diff:.2f}, "
          f"mean cosine of shared tokens {result.mean_cosine:.4f}")


if __name__ == "__main__":
    main()
