"""INT8 vision graph with the reducer left exact: static post-training quantisation (onnxruntime, QDQ), or the
per-token form (:mod:`.per_token`, onnxruntime only).

Static: the encoder's (and projector's) MatMul / Conv / Gemm weights and activations are quantised: per-channel
symmetric int8 weights; activations symmetric int8 for TensorRT (zero points 0, as its explicit Q/DQ requires) or
uint8 for onnxruntime's CPU kernels, one scale per tensor from the calibration images. Per-token: the same MatMuls
with scales per token computed at run time (the images then only measure the agreement). In both, every node traced
from the reducer, plus Softmax and LayerNormalization, stays float, so token selection sees the same arithmetic as
in fp32 on whatever features the quantised encoder produces.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ..artifact.contract import INPUT_NAME, VisionOutput
from ..artifact.manifest import Int8Record
from ..errors import ConfigError, ExportError
from ..artifact.agreement import agreement

CALIBRATION_METHODS = Int8Record.METHODS  # the contract's vocabulary: what a manifest may record
QUANTIZED_OPS = ["MatMul", "Conv", "Gemm"]


def float_nodes(onnx_path: Path, float_layers: int = 0, parts=()) -> list:
    """Nodes that must stay float: the reducer's (by export metadata), Softmax, LayerNormalization, every MatMul of
    two activations (attention's q.k and weights.v: what an ONNX Attention op at opset 23 keeps float inside it; one
    static scale for attention scores moved the demo VLM's selection, mean Jaccard 0.78 vs 0.89 kept float), and with
    ``float_layers = K`` every node of the tower's last K encoder layers (K = 1: the last layer's LayerNorm and q/k
    projections, all that feeds token selection after the penultimate state; K > 1 also the layers producing it);
    ``parts``: every node of those tower parts (:func:`tower_parts` names them: ``"embeddings"``, ``"layer N"``)."""
    import onnx

    from ..artifact.node_stages import classify_nodes

    stages = classify_nodes(onnx_path)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    keep = {n.name for n in graph.node if stages.get(n.name) in ("reducer", "vision_other")}
    keep |= {n.name for n in graph.node if n.op_type in ("Softmax", "LayerNormalization")}
    constants = {init.name for init in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    keep |= {n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)}
    part_of = tower_part_of(graph)
    layers = {name: int(part.split()[1]) for name, part in part_of.items() if part.startswith("layer ")}
    if float_layers > 0 and layers:
        last = max(layers.values())
        keep |= {name for name, layer in layers.items() if layer > last - float_layers}
    wanted = set(parts)
    keep |= {name for name, part in part_of.items() if part in wanted}
    return sorted(keep)


def tower_parts(onnx_path: Path) -> list:
    """The tower's parts holding a quantisable op, in order: ``"embeddings"`` (the patch embedding: it quantises the
    input pixels themselves) then ``"layer N"`` per encoder layer present (a graph that stops early holds fewer
    layers than the tower). What ``--int8-target-jaccard`` chooses among."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    quantisable = {n.name for n in graph.node if n.op_type in QUANTIZED_OPS}
    found = {part for name, part in tower_part_of(graph).items() if name in quantisable}
    return sorted(found, key=lambda part: (part != "embeddings", int(part.split()[1]) if part != "embeddings" else 0))


def tower_part_of(graph) -> dict:
    """Node name -> ``"layer N"`` (encoder layer N) or ``"embeddings"`` (the rest of the tower: patch and position
    embeddings, pre-norm), from the exporter's name scopes; nodes outside the tower are not listed."""
    import re

    from ..model.towers import layer_scope_pattern

    pattern = layer_scope_pattern()  # each tower family's own layer path
    part_of = {}
    for node in graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if "'encoder.tower" not in scopes:
            continue
        found = re.findall(pattern, scopes)
        part_of[node.name] = f"layer {int(found[-1])}" if found else "embeddings"
    return part_of


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed images, one image per batch; a graph that reads the
    question (cdpruner) also gets the contract's fixed probe question: the tower's and projector's activations, which
    the scales are taken from, do not depend on it, and the reducer that reads it stays float."""

    def __init__(self, pixels: np.ndarray, input_name: str, question_width: int | None = None) -> None:
        from ..artifact.contract import probe_question

        extra = probe_question(1, question_width) if question_width else {}
        self.items = iter([{input_name: pixels[i : i + 1], **extra} for i in range(len(pixels))])

    def get_next(self):
        return next(self.items, None)

    def rewind(self):  # pragma: no cover - not used by static calibration here
        raise NotImplementedError


TARGETS = Int8Record.TARGETS
PER_TOKEN_NOT_TENSORRT = ("--calibration-method per-token is an onnxruntime form (MatMulInteger with scales computed "
                          "per token at run time); TensorRT builds INT8 from an explicit Q/DQ graph: use minmax, "
                          "entropy or percentile with --target / --engine / --int8-target tensorrt")


def quantize_vision(fp32_path: Path, int8_path: Path, pixels: np.ndarray, method: str = "minmax",
                    input_name: str = INPUT_NAME, target: str = "cpu", float_layers: int = 0,
                    float_parts=()) -> Int8Record:
    """Write the INT8 graph (static Q/DQ, or ``method="per-token"``); return what was done (the manifest's record,
    its agreement still to measure).

    ``target="tensorrt"``: symmetric int8 activations (TensorRT's explicit quantisation needs zero points of 0).
    ``target="cpu"``: uint8 activations, which onnxruntime's CPU kernels fuse (S8S8 runs slower than fp32 there).
    ``float_parts``: tower parts (:func:`tower_parts`) left float, as :func:`quantize_and_compare` chooses them.
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown INT8 target {target!r}; choose one of: {', '.join(TARGETS)}")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of: {', '.join(CALIBRATION_METHODS)}")
    if float_layers < 0:
        raise ConfigError(f"float layers must be >= 0, got {float_layers}")
    if method == "per-token" and target == "tensorrt":
        raise ConfigError(PER_TOKEN_NOT_TENSORRT)
    excluded = float_nodes(fp32_path, float_layers, float_parts)
    large = sum(p.stat().st_size for p in fp32_path.parent.glob(fp32_path.name + "*")) > (1 << 30)
    start = time.perf_counter()
    if method == "per-token":
        from .per_token import quantize_per_token

        try:
            quantize_per_token(fp32_path, int8_path, set(excluded), external_data=large)
        except Exception as exc:
            raise ExportError(f"INT8 quantisation of {fp32_path.name} failed: {exc}") from exc
        return Int8Record(format="MatMulInteger", calibration_method=method, calibration_images=int(len(pixels)),
                          quantized_ops=["MatMul"], float_nodes=len(excluded), per_channel=True, target=target,
                          activations="uint8 per token", float_layers=float_layers,
                          float_parts=list(float_parts),
                          seconds=round(time.perf_counter() - start, 1))
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    try:
        quantize_static(
            str(fp32_path), str(int8_path), _Reader(pixels.astype(np.float32), input_name, _question_width(fp32_path)),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
            activation_type=QuantType.QInt8 if target == "tensorrt" else QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded, calibrate_method=calibrate, use_external_data_format=large,
            extra_options={"ActivationSymmetric": target == "tensorrt", "WeightSymmetric": True},
        )
    except Exception as exc:
        raise ExportError(f"INT8 quantisation of {fp32_path.name} failed: {exc}") from exc
    return Int8Record(format="QDQ", calibration_method=method, calibration_images=int(len(pixels)),
                      quantized_ops=list(QUANTIZED_OPS), float_nodes=len(excluded), per_channel=True, target=target,
                      activations="int8 symmetric" if target == "tensorrt" else "uint8", float_layers=float_layers,
                      float_parts=list(float_parts),
                      seconds=round(time.perf_counter() - start, 1))


def _question_width(onnx_path: Path) -> int | None:
    """The width of the graph's question input (a question-reading graph), else None; read without the weights."""
    import onnx

    from ..artifact.contract import QUESTION_INPUTS

    for graph_input in onnx.load(str(onnx_path), load_external_data=False).graph.input:
        if graph_input.name == QUESTION_INPUTS[0]:
            return int(graph_input.type.tensor_type.shape.dim[-1].dim_value)
    return None


def session_outputs(path: Path, pixels: np.ndarray, batch: int = 8) -> VisionOutput:
    """Run an ONNX vision graph on onnxruntime CPU over ``pixels`` (the runtime's session, in batches of
    ``batch``; a question-reading graph with the probe question)."""
    from ..runtime.vision import VisionSession

    session = VisionSession.from_graph(path, batch_max=batch)
    return session.run_pixels(pixels, session.probe_question(len(pixels)))


def latency_ratio(fp32_path: Path, int8_path: Path, pixels: np.ndarray, runs: int = 5) -> float:
    """fp32 / int8 median batch-1 latency on onnxruntime CPU, measured alternately in one process."""
    import statistics

    from ..runtime.vision import VisionSession

    sessions = [VisionSession.from_graph(p, batch_max=1) for p in (fp32_path, int8_path)]
    feed = pixels[:1]
    times = ([], [])
    for s in sessions:
        s.run_pixels(feed, s.probe_question(1))
    for _ in range(runs):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run_pixels(feed, s.probe_question(1))
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def quantize_and_compare(fp32_path: Path, int8_path: Path, pixels: np.ndarray, method: str = "minmax",
                         target: str = "cpu", float_layers: int = 0, target_jaccard: float | None = None,
                         log=print) -> Int8Record:
    """The one INT8 flow, for ``build`` and ``calibrate --report`` alike: choose the tower parts to keep float (with
    ``target_jaccard``; ``float_layers`` is the other way), quantise, and record how the INT8 graph's selection
    agrees with fp32's on ``pixels`` (the calibration set itself)."""
    if target_jaccard is None:
        record = quantize_vision(fp32_path, int8_path, pixels, method, target=target, float_layers=float_layers)
    else:
        import tempfile

        from .sensitivity import choose_float_parts

        reference = session_outputs(fp32_path, pixels)
        with tempfile.TemporaryDirectory(prefix=".int8-probes-", dir=int8_path.parent) as scratch:
            probe_path = Path(scratch) / "probe.onnx"

            def probe(float_parts: tuple) -> float:  # quantised with these parts float, compared on the set
                for old in Path(scratch).glob("probe.onnx*"):
                    old.unlink()
                quantize_vision(fp32_path, probe_path, pixels, method, target=target, float_parts=float_parts)
                return agreement(reference, session_outputs(probe_path, pixels)).mean_jaccard

            choice = choose_float_parts(tower_parts(fp32_path), probe, target_jaccard, log)
        record = quantize_vision(fp32_path, int8_path, pixels, method, target=target, float_parts=choice.parts)
        record = dataclasses.replace(record, target_jaccard=float(target_jaccard), sensitivity=choice.sensitivity())
    log("comparing INT8 with fp32 on the calibration set")
    return dataclasses.replace(record, agreement=agreement(session_outputs(fp32_path, pixels),
                                                           session_outputs(int8_path, pixels)))
