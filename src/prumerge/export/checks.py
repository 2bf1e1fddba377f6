"""Graph checks after export: ONNX validity, TensorRT parser op support, and where shapes become data-dependent.

Follows optimum's habit of treating validation as a real step with typed errors: a graph that fails here is never
written into an artifact.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..artifact.manifest import OpSupport
from ..errors import ExportError

OP_TABLE = "tensorrt_onnx_ops.json"


def load_op_table() -> dict:
    return json.loads(resources.files("prumerge.data").joinpath(OP_TABLE).read_text())


def check_onnx(path: Path) -> None:
    """``onnx.checker`` full check (with shape inference) on the file, external data included."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError / protobuf errors
        raise ExportError(f"{path.name} fails the ONNX checker: {exc}") from exc


def op_support(model, version: str | None = None, table: dict | None = None) -> OpSupport:
    """Check every node (subgraphs included) of an ``onnx.ModelProto`` against the TensorRT op table for
    ``version`` (default: the table's default, TensorRT 10.3 / JetPack 6)."""
    from onnx import numpy_helper

    table = table or load_op_table()
    version = version or table["default_version"]
    if version not in table["versions"]:
        raise ExportError(f"no TensorRT op data for version {version}; known: {', '.join(table['versions'])}")
    limits = table["versions"][version]
    supported, restrictions = set(table["supported"]), table.get("restrictions", {})
    supported -= {op for op, since in table.get("added_in", {}).items() if _version(version) < _version(since)}
    data_dependent_ops = set(table.get("data_dependent_ops", []))
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            constants[node.output[0]] = node.attribute[0].t
    counts: dict = {}
    unsupported, violations, dynamic = set(), [], []
    for node in _walk(model.graph):
        if node.domain not in ("", "ai.onnx"):
            unsupported.add(f"{node.domain}::{node.op_type}")
            continue
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type not in supported:
            unsupported.add(node.op_type)
        if node.op_type in data_dependent_ops:
            dynamic.append(f"{node.op_type} ({node.name or node.output[0]})")
        if node.op_type == "TopK" and "TopK" in restrictions:
            k_name = node.input[1] if len(node.input) > 1 else ""
            if k_name in constants:  # a dynamic K is supported (TensorRT 8.6+); a constant one must be below the limit
                k = int(numpy_helper.to_array(constants[k_name]).reshape(-1)[0])
                limit = restrictions["TopK"].get("k_max")
                if limit is not None and k >= limit:
                    violations.append(f"TopK {node.name}: K={k} must be below {limit}")
        if node.op_type == "CumSum" and (len(node.input) < 2 or node.input[1] not in constants):
            violations.append(f"CumSum {node.name}: axis is not a build-time constant")
    if dynamic and not limits["data_dependent_shapes"]:
        newer = [v for v, spec in table["versions"].items() if spec["data_dependent_shapes"]]
        violations.append(f"data-dependent output shapes ({', '.join(dynamic)}) need TensorRT {' or '.join(newer)}+ "
                          "with an output allocator; export the padded contract for this version")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > limits["max_opset"]:
        violations.append(f"opset {opset} is newer than TensorRT {version} parses ({limits['max_opset']})")
    return OpSupport(version, dict(sorted(counts.items())), sorted(unsupported), violations, dynamic)


def op_support_all(model) -> dict:
    """``{version: OpSupport}`` for every TensorRT version in the op table."""
    table = load_op_table()
    return {version: op_support(model, version, table) for version in table["versions"]}


def _version(text: str) -> tuple:
    return tuple(int(part) for part in str(text).split(".")[:2])


def _walk(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _walk(attr.g)
            for sub in attr.graphs:
                yield from _walk(sub)
