"""ViT-L/14-336 + PruMerge + LLaVA-1.5 projector: onnxruntime CPU (fused and plain attention) vs torch eager and vs
the FLOP floor, one run, same inputs.

Exports the graph twice: opset 23, each encoder layer's attention one ONNX ``Attention`` op (the default for
onnxruntime builds), and opset 18, the plain MatMul/Softmax form (what TensorRT targets get). Prints export time,
file sizes, latency of each (median over runs, batch 1) and each runtime's peak RSS (each measured in its own child
process so the numbers do not mix), the ratios (goal: onnxruntime >= 1.5x torch eager), and each graph against the
FLOP floor: the graph's multiply-adds (counted from the model's shapes) at the GFLOP/s onnxruntime itself reaches on
one large MatMul of the tower's own shape on this machine (goal: within 1.10x of it). Random weights, last-layer q/k
sharpened (see common.py).
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
    """Run one runtime alone and print latency + peak RSS as JSON (``kind``: torch, or an opset's graph folder)."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from common import timed

    from prumerge.latency.stats import peak_rss_mb

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

        session = ort.InferenceSession(str(workdir / kind / "vision.onnx"), providers=["CPUExecutionProvider"])
        out = session.run(None, {"pixel_values": pixels})
        latency = timed(lambda: session.run(None, {"pixel_values": pixels}), runs)
        counts = out[1].tolist()
        batch8 = np.repeat(pixels, 8, axis=0)
        throughput = {"images_per_s_batch1": 1 / latency,
                      "images_per_s_batch8": 8 / timed(lambda: session.run(None, {"pixel_values": batch8}), max(2, runs // 2))}
    print(json.dumps({"latency_s": latency, "peak_rss_mb": peak_rss_mb(), "num_tokens": counts,
                      **(throughput if kind != "torch" else {})}))


def graph_flops(kept: int, layers: int = 24, tokens: int = 577, width: int = 1024, mlp: int = 4096) -> float:
    """Floating-point operations (2 per multiply-add) the graph must do at batch 1: patch embedding; the encoder up
    to the penultimate layer (LLaVA's features); the last layer's q/k for the CLS row and all keys (what PruMerge
    reads: its LayerNorm, 1 query, 577 keys); the attention scores; the projector on the ``kept`` tokens. The
    reducer's own work (a 576 x 576 key similarity) is counted too."""
    patches = tokens - 1
    embed = 2 * patches * (3 * 14 * 14) * width
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    selection = 2 * (1 + tokens) * width * width + 2 * tokens * width + 2 * patches * patches * width
    projector = 2 * kept * (width * 4096 + 4096 * 4096)
    return embed + (layers - 1) * per_layer + selection + projector


def onnxruntime_gflops(runs: int = 5, tokens: int = 577, width: int = 1024, mlp: int = 4096) -> float:
    """GFLOP/s onnxruntime reaches on this machine for one MatMul of the tower's MLP shape ([577, 1024] x [1024,
    4096]): the rate the floor assumes for every FLOP of the graph."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    sys.path.insert(0, str(HERE))
    from common import timed

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(width, mlp)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, mlp])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(tokens, width)).astype(np.float32)
    seconds = timed(lambda: session.run(None, {"x": x}), runs * 4)
    return 2 * tokens * width * mlp / seconds / 1e9


GRAPHS = {"opset23": (23, "fused attention (opset 23)"), "opset18": (18, "plain attention (opset 18)")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--method", default="prumerge")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prumerge-bench-"))
    if args.child:
        return child(args.child, workdir, args.runs, args.method)

    import collections
    import shutil

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from prumerge.export.checks import check_onnx
    from prumerge.export.graph import export_onnx, simplify

    encoder = make_encoder(args.method)
    pixels = np.random.default_rng(0).normal(size=(1, 3, 336, 336)).astype(np.float32)
    np.save(workdir / "pixels.npy", pixels)
    exported = {}
    for name, (opset, _) in GRAPHS.items():
        folder = workdir / name
        folder.mkdir(exist_ok=True)
        start = time.perf_counter()
        export_onnx(encoder, folder / "vision.onnx", "padded", opset=opset, batch_max=8)
        export_s = time.perf_counter() - start
        check_onnx(folder / "vision.onnx")
        # onnxslim, as the build runs it: node counts, and outputs of the exporter's graph vs the simplified one
        plain = folder / "unslimmed"
        plain.mkdir(exist_ok=True)
        for part in folder.glob("vision.onnx*"):
            shutil.copy(part, plain / part.name)
        slim = simplify(folder / "vision.onnx")
        outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})
                   for p in (plain / "vision.onnx", folder / "vision.onnx")]
        shutil.rmtree(plain)
        ops = collections.Counter(n.op_type for n in onnx.load(str(folder / "vision.onnx"), load_external_data=False).graph.node)
        exported[name] = {"export_s": export_s, "slim": slim, "outputs": outputs[1], "attention_ops": ops["Attention"],
                          "slim_diff": max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(*outputs)),
                          "sizes": {p.name: p.stat().st_size / 1e6 for p in sorted(folder.iterdir()) if p.name.startswith("vision")}}
    del encoder

    results = {}
    for kind in ("torch", *GRAPHS):
        cmd = [sys.executable, __file__, "--child", kind, "--workdir", str(workdir), "--runs", str(args.runs), "--method", args.method]
        results[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    gflops = onnxruntime_gflops(args.runs)
    kept = int(results["opset23"]["num_tokens"][0])
    floor_s = graph_flops(kept) / gflops / 1e9

    print(f"ViT-L/14-336 + {args.method} + LLaVA-1.5 projector (1024->4096->4096), random weights; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {torch.get_num_threads()} threads, batch 1, median of {args.runs} runs")
    for name, (opset, label) in GRAPHS.items():
        e = exported[name]
        print(f"{label}: export (dynamo) {e['export_s']:.1f} s, {e['attention_ops']} Attention ops; files: "
              + ", ".join(f"{k} {v:.1f} MB" for k, v in e["sizes"].items())
              + f"; onnxslim {e['slim'].get('nodes_before')} -> {e['slim'].get('nodes_after')} nodes, outputs max |diff| "
              f"vs the exporter's graph {e['slim_diff']:.1e}" + (" (bit-identical)" if e["slim_diff"] == 0 else ""))
    fused, plain_out = exported["opset23"]["outputs"], exported["opset18"]["outputs"]
    print(f"fused vs plain: same counts {np.array_equal(fused[1], plain_out[1])}, same indices "
          f"{np.array_equal(fused[2], plain_out[2])}, tokens max |diff| {float(np.abs(fused[0] - plain_out[0]).max()):.1e}")
    print(f"FLOP floor: {graph_flops(kept) / 1e9:.1f} GFLOP at {gflops:.1f} GFLOP/s (onnxruntime, one [577,1024]x[1024,4096] "
          f"MatMul) = {floor_s * 1e3:.0f} ms")
    for kind, label in (("torch", "torch eager"), *((n, f"onnxruntime, {GRAPHS[n][1]}") for n in GRAPHS)):
        r = results[kind]
        print(f"{label:<42} {r['latency_s'] * 1e3:8.1f} ms  ({r['latency_s'] / floor_s:.2f}x the floor)   "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB   tokens {r['num_tokens']}")
    for name in GRAPHS:
        r = results[name]
        print(f"onnxruntime {GRAPHS[name][1]} throughput: {r['images_per_s_batch1']:.2f} images/s at batch 1, "
              f"{r['images_per_s_batch8']:.2f} at batch 8")
    torch_s = results["torch"]["latency_s"]
    print(f"speed-up over torch eager: fused {torch_s / results['opset23']['latency_s']:.2f}x, plain "
          f"{torch_s / results['opset18']['latency_s']:.2f}x (goal >= 1.5x); fused over plain "
          f"{results['opset18']['latency_s'] / results['opset23']['latency_s']:.2f}x; same token counts: "
          f"{results['torch']['num_tokens'] == results['opset23']['num_tokens'] == results['opset18']['num_tokens']}")


if __name__ == "__main__":
    main()
