"""INT8 with per-token activation scales: each MatMul of the tower becomes ``MatMulInteger`` on int8 per-channel
weights and uint8 activations whose scale is computed at run time for every row (token) of its input.

Why a form of its own: static Q/DQ gives every activation tensor one scale fixed at calibration, and on real weights
(DINOv2-S, 28 photos) that moves PruMerge's selection a lot (mean Jaccard 0.64-0.69 vs fp32); onnxruntime's
``quantize_dynamic`` computes the scale at run time but still one per tensor (0.87). A scale per token follows each
token's own range (0.91 measured, see README "Calibration"), at a cost of a few elementwise ops per MatMul. The
activation code is symmetric around a fixed zero point of 128 (uint8), so onnxruntime's fast u8s8 kernel runs it and
the zero point stays the scalar its ``MatMulInteger`` requires. TensorRT builds INT8 only from explicit Q/DQ, so
this form is for onnxruntime targets.

Arithmetic, per row ``x`` of a MatMul input and column ``n`` of its weight ``W``:
``s = max|x| / 127``; ``q = clip(round(x / s) + 128, 0, 255)``; ``w_n = max|W[:, n]| / 127``;
``y[n] = s * w_n * sum_k (q_k - 128) * round(W[k, n] / w_n)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ZERO_POINT = 128
SCOPE_KEY = "pkg.torch.onnx.name_scopes"  # copied onto every node made for a MatMul: stages and profiles still see it


def quantize_per_token(src: Path, dst: Path, exclude: set, external_data: bool = False) -> int:
    """Write ``src`` with every MatMul of a 2-D constant weight (not named in ``exclude``) in the per-token INT8
    form; return how many were converted."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ValueError(f"the per-token INT8 form needs opset 13 or newer, the graph has {opset}")
    weights = {init.name: init for init in graph.initializer}
    nodes, constants, converted = [], [], 0

    def constant(name: str, value) -> str:
        constants.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    shared = {
        "zero_point": constant("per_token/zero_point", np.array(ZERO_POINT, dtype=np.uint8)),
        "127": constant("per_token/127", np.array(127.0, dtype=np.float32)),
        "128": constant("per_token/128", np.array(float(ZERO_POINT), dtype=np.float32)),
        "0": constant("per_token/0", np.array(0.0, dtype=np.float32)),
        "255": constant("per_token/255", np.array(255.0, dtype=np.float32)),
        "tiny": constant("per_token/tiny", np.array(1e-12, dtype=np.float32)),
        "last_axis": constant("per_token/last_axis", np.array([-1], dtype=np.int64)),
        "begin": constant("per_token/begin", np.array([0], dtype=np.int64)),
        "all_but_last": constant("per_token/all_but_last", np.array([-1], dtype=np.int64)),
    }
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or node.name in exclude or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        columns = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        prefix = f"{node.name}/per_token/"
        wq = constant(prefix + "weight", np.clip(np.round(w / columns), -127, 127).astype(np.int8))
        wscale = constant(prefix + "weight_scale", columns.astype(np.float32))
        rows = constant(prefix + "rows", np.array([-1, w.shape[0]], dtype=np.int64))
        width = constant(prefix + "width", np.array([w.shape[1]], dtype=np.int64))
        scope = [p for p in node.metadata_props if p.key == SCOPE_KEY]

        def make(op: str, inputs: list, output: str, **attrs) -> str:
            made = helper.make_node(op, inputs, [output], name=output, **attrs)
            made.metadata_props.extend(scope)
            nodes.append(made)
            return output

        x = make("Reshape", [node.input[0], rows], prefix + "x")
        magnitude = make("Abs", [x], prefix + "abs")
        if opset >= 18:  # axes became an input in opset 18
            peak = make("ReduceMax", [magnitude, shared["last_axis"]], prefix + "peak", keepdims=1)
        else:
            peak = make("ReduceMax", [magnitude], prefix + "peak", keepdims=1, axes=[-1])
        scale = make("Div", [make("Max", [peak, shared["tiny"]], prefix + "peak_nonzero"), shared["127"]], prefix + "scale")
        code = make("Add", [make("Round", [make("Div", [x, scale], prefix + "scaled")], prefix + "rounded"), shared["128"]],
                    prefix + "shifted")
        code = make("Cast", [make("Clip", [code, shared["0"], shared["255"]], prefix + "clipped")], prefix + "code",
                    to=TensorProto.UINT8)
        acc = make("MatMulInteger", [code, wq, shared["zero_point"]], prefix + "acc")
        y = make("Mul", [make("Mul", [make("Cast", [acc], prefix + "acc_float", to=TensorProto.FLOAT), scale],
                              prefix + "row_scaled"), wscale], prefix + "y")
        lead = make("Slice", [make("Shape", [node.input[0]], prefix + "shape"), shared["begin"], shared["all_but_last"]],
                    prefix + "lead")
        out_shape = make("Concat", [lead, width], prefix + "out_shape", axis=0)
        final = helper.make_node("Reshape", [y, out_shape], list(node.output), name=node.name)
        final.metadata_props.extend(node.metadata_props)
        nodes.append(final)
        converted += 1
    used = {name for n in nodes for name in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + [c for c in constants if c.name in used])
    if external_data:
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))
    return converted


def reference_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The same arithmetic in numpy (the tests' plain reference)."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    scale = np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-12) / np.float32(127.0)
    code = np.clip(np.round(rows / scale) + ZERO_POINT, 0, 255).astype(np.int64) - ZERO_POINT
    columns = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0).astype(np.float32)
    wq = np.clip(np.round(w / columns), -127, 127).astype(np.int64)
    y = (code @ wq).astype(np.float32) * scale * columns
    return y.reshape(*x.shape[:-1], w.shape[1])
