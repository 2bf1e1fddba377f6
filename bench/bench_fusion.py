"""Does onnxruntime's transformer optimizer (attention / LayerNorm / GELU fusion) help the exported vision graph?

Runs ``onnxruntime.transformers.optimizer.optimize_model`` (model types clip and vit) on an artifact's vision graph,
prints the fused-op counts, checks the result against the original (counts and indices identical, max |diff|) and
times both side by side. Usage: python bench/bench_fusion.py [--artifact artifacts/demo] [--runs 10]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FUSED = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "Gelu", "FastGelu",
         "BiasGelu", "QuickGelu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", type=Path, default=HERE.parent / "artifacts" / "demo")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    manifest = json.loads((args.artifact / "manifest.json").read_text())
    source = args.artifact / manifest["vision"]["file"]
    size = manifest["reducer"]["image_size"]
    config = json.loads((args.artifact.parent / f"{args.artifact.name}-checkpoint" / "config.json").read_text()) \
        if (args.artifact.parent / f"{args.artifact.name}-checkpoint" / "config.json").is_file() else None
    vision = (config or {}).get("vision_config", {})
    heads, hidden = vision.get("num_attention_heads", 0), vision.get("hidden_size", 0)
    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)

    def timed(session):
        session.run(None, {"pixel_values": x})
        start = time.perf_counter()
        for _ in range(args.runs):
            session.run(None, {"pixel_values": x})
        return (time.perf_counter() - start) / args.runs * 1e3

    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    reference = original.run(None, {"pixel_values": x})
    counts = collections.Counter(n.op_type for n in onnx.load(str(source), load_external_data=False).graph.node)
    print(f"{source}: {sum(counts.values())} nodes; fused ops before: {{{', '.join(f'{k}: {counts[k]}' for k in FUSED if counts[k])}}}")
    base = timed(original)
    with tempfile.TemporaryDirectory() as scratch:
        for model_type in ("clip", "vit"):
            optimized = optimize_model(str(source), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=1)
            after = collections.Counter(n.op_type for n in optimized.model.graph.node)
            path = Path(scratch) / f"{model_type}.onnx"
            optimized.save_model_to_file(str(path))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out = session.run(None, {"pixel_values": x})
            same = np.array_equal(out[1], reference[1]) and np.array_equal(out[2], reference[2])
            print(f"optimizer ({model_type}): {sum(after.values())} nodes, fused "
                  f"{{{', '.join(f'{k}: {after[k]}' for k in FUSED if after[k])}}}; counts and indices identical: {same}, "
                  f"max |diff| {float(np.abs(out[0] - reference[0]).max()):.1e}; {timed(session):.1f} ms vs {base:.1f} ms unfused")


if __name__ == "__main__":
    main()
