"""Which vision-graph node belongs to which stage (encoder, reducer, projector), from the exporter's own records.

The dynamo exporter stores each node's PyTorch module scope and stack trace in ``metadata_props``: nodes under
``encoder.tower`` are the vision encoder, under ``encoder.projector`` the projector, and nodes traced from a
reducer the reducer: the reducers are plain functions, so their nodes carry no module scope, only a stack trace that
passes through ``prumerge/reduce/`` or ends at ``REDUCER_CALL``, the one line where the encoder calls a registered
method's function (``prumerge.reduce.registry``).
Profiling splits time by it, INT8 keeps reducer nodes float by it, TensorRT pins them to FP32 by it. The build
records the result in the manifest (``vision.node_stages``), so a device without onnx still has it.
"""

from __future__ import annotations

from pathlib import Path

STAGES = ("vision_encoder", "reducer", "projector", "vision_other")
# how PruMergeEncoder.forward calls every registered method's reducer (``prumerge.reduce.registry``); a test keeps the
# encoder's source saying so
REDUCER_CALL = "spec.run("


def classify_nodes(onnx_path: Path) -> dict:
    """``{node name: stage}`` for every node of the graph (reads no weights)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    stages = {}
    for node in graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes", "")
        trace = meta.get("pkg.torch.onnx.stack_trace", "")
        stages[node.name] = stage_of(scopes, trace)
    return stages


def stage_of(scopes: str, trace: str) -> str:
    """The rule alone, for one node's recorded module scopes and stack trace."""
    if "'encoder.tower" in scopes:
        return "vision_encoder"
    if "'encoder.projector" in scopes:
        return "projector"
    if REDUCER_CALL in trace or "prumerge/reduce/" in trace.replace("\\", "/"):
        return "reducer"
    return "vision_other"


def compress(stages: dict) -> dict:
    """``{stage: [node names]}`` (for the manifest) from ``{node name: stage}``."""
    out = {s: [] for s in STAGES}
    for name, stage in stages.items():
        out[stage].append(name)
    return out


def expand(grouped: dict) -> dict:
    return {name: stage for stage, names in grouped.items() for name in names}
