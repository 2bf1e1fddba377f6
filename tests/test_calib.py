"""Calibration: image sets, token-budget statistics and capacity, INT8 graph and its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from prumerge.calib import BudgetReport, CalibrationSet, calibrate_budget, capacity_for_coverage
from prumerge.calib.budget import count_stats, histogram
from prumerge.artifact.contract import VisionOutput
from prumerge.artifact.manifest import Manifest
from prumerge.calib.int8 import float_nodes
from prumerge.cli import main
from prumerge.errors import ConfigError, InputError
from prumerge.export.build import build_artifact
from prumerge.export.options import BuildOptions, Int8Options
from prumerge.export.validate import agreement
from prumerge.runtime import VisionSession

pytestmark = pytest.mark.slow


def test_capacity_for_coverage_and_stats():
    counts = [2] * 90 + [10] * 9 + [50]  # known distribution of 100 images
    assert capacity_for_coverage(counts, 0.9) == 2
    assert capacity_for_coverage(counts, 0.95) == 10
    assert capacity_for_coverage(counts, 0.99) == 10
    assert capacity_for_coverage(counts, 0.999) == 50 == capacity_for_coverage(counts, 1.0)
    stats = count_stats(counts)
    assert stats["max"] == 50 and stats["p50"] == 2 and stats["mean"] == pytest.approx((180 + 90 + 50) / 100)
    with pytest.raises(ConfigError):
        capacity_for_coverage(counts, 0)
    with pytest.raises(InputError):
        capacity_for_coverage([], 0.9)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(7):
        mode = ["RGB", "L", "RGBA", "P"][i % 4]
        Image.fromarray(rng.integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8)).convert(mode).save(
            path / f"img{i}.{['png', 'jpg', 'webp', 'png'][i % 4] if mode != 'RGBA' or i % 4 != 1 else 'png'}")
    (path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (path / "notes.txt").write_text("not an image")
    return path


def test_folder_set_skips_broken_and_samples_deterministically(folder):
    full = CalibrationSet.from_folder(folder)
    assert len(full.images) == 7 and [s["file"] for s in full.skipped] == ["broken.jpg"]
    assert all(im.mode == "RGB" for im in full.images)
    a, b = CalibrationSet.from_folder(folder, limit=4, seed=3), CalibrationSet.from_folder(folder, limit=4, seed=3)
    assert a.names == b.names and len(a.names) + len(a.skipped) == 4 and a.names == sorted(a.names)
    assert CalibrationSet.from_source(a.source).names == a.names
    with pytest.raises(InputError, match="not found"):
        CalibrationSet.from_folder(folder / "nope")


def test_budget_counts_match_the_reducer(llava_dir, folder, tmp_path):
    import torch

    from prumerge import PruMergeEncoder
    from prumerge.artifact.preprocess_config import PreprocessConfig
    from prumerge.runtime.preprocess import preprocess_batch

    images = CalibrationSet.from_folder(folder)
    report = calibrate_budget(str(llava_dir), images, coverage=0.8)
    encoder = PruMergeEncoder.from_pretrained(llava_dir, method="prumerge+")
    with torch.no_grad():
        expected = encoder(torch.from_numpy(preprocess_batch(images.images, PreprocessConfig.from_processor_dict(None, 112)))).num_tokens
    assert report.methods["prumerge+"]["num_tokens"] == expected.tolist()
    assert report.methods["prumerge"]["capacity"] == capacity_for_coverage(report.methods["prumerge"]["num_tokens"], 0.8)
    path = report.write(tmp_path / "cal.json")
    assert BudgetReport.read(path).capacity("prumerge") == report.methods["prumerge"]["capacity"]
    with Image.open(histogram(report, tmp_path / "h.png")) as png:
        assert png.format == "PNG"
    with pytest.raises(InputError, match="cannot read calibration file"):
        BudgetReport.read(tmp_path / "h.png")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(InputError, match="not a prumerge calibration"):
        BudgetReport.read(tmp_path / "other.json")


def test_int8_build_keeps_reducer_float_and_reports(llava_dir, folder, tmp_path):
    images = CalibrationSet.from_folder(folder)
    report = calibrate_budget(str(llava_dir), images, coverage=0.8)
    cal = report.write(tmp_path / "cal.json")
    manifest = build_artifact(str(llava_dir), tmp_path / "int8", BuildOptions(llm=None, int8=Int8Options(), calibration=str(cal)))
    assert manifest.vision.capacity == report.capacity("prumerge")
    assert manifest.vision.precision == "int8" and manifest.vision.int8.calibration_images == 7
    agreement_ = manifest.vision.int8.agreement
    # read back from disk as a runtime reads it: the same typed record
    assert Manifest.read(tmp_path / "int8").vision.int8 == manifest.vision.int8
    # the recorded agreement is what an independent comparison measures: PyTorch fp32 vs the INT8 graph
    import torch

    from prumerge import PruMergeEncoder
    from prumerge.export.validate import reference_output
    from prumerge.runtime.preprocess import preprocess_batch

    encoder = PruMergeEncoder.from_pretrained(llava_dir, method="prumerge", capacity=report.capacity("prumerge"))
    pixels = preprocess_batch(images.images, encoder.preprocess_config())
    with torch.no_grad():
        fp32 = reference_output(encoder(torch.from_numpy(pixels)))
    int8_out = VisionSession.open(tmp_path / "int8").run_pixels(pixels)
    independent = agreement(fp32, int8_out)
    assert agreement_.mean_jaccard == pytest.approx(independent.mean_jaccard, abs=1e-6)
    assert agreement_.identical_selection == pytest.approx(independent.identical_selection, abs=1e-6)
    assert agreement_.mean_cosine == pytest.approx(independent.mean_cosine, abs=1e-3)
    import onnx

    graph = onnx.load(str(tmp_path / "int8" / "vision.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 5
    from prumerge.artifact.node_stages import classify_nodes

    stages = classify_nodes(tmp_path / "int8" / "vision.onnx")
    produced_by = {o: n for n in graph.node for o in n.output}
    for node in graph.node:  # no reducer node reads a quantised tensor directly
        if stages.get(node.name) == "reducer":
            assert all(produced_by.get(i) is None or produced_by[i].op_type != "QuantizeLinear" for i in node.input)
    assert np.isfinite(int8_out.tokens).all() and (int8_out.num_tokens <= manifest.vision.capacity).all()
    with pytest.raises(ConfigError, match="needs --calibration"):
        build_artifact(str(llava_dir), tmp_path / "x", BuildOptions(llm=None, int8=Int8Options()))


def test_agreement_metric():
    tokens = np.random.default_rng(0).normal(size=(1, 5, 4)).astype(np.float32)
    a = VisionOutput(tokens, np.array([4]), np.array([[3, 1, 2, -1, -2]]), np.zeros(1, bool))
    same = agreement(a, a)
    assert same.mean_jaccard == 1 and same.identical_selection == 1 and same.mean_cosine == pytest.approx(1)
    b = VisionOutput(tokens, np.array([3]), np.array([[3, 7, -1, -2, -2]]), np.zeros(1, bool))
    other = agreement(a, b)
    assert other.mean_jaccard == pytest.approx(1 / 4) and other.mean_count_diff == 1


def test_calibrate_cli(llava_dir, folder, tmp_path):
    result = CliRunner().invoke(main, ["calibrate", str(folder), "--model", str(llava_dir), "--out", str(tmp_path / "c.json"),
                                       "--coverage", "0.9", "--report", "--report-json", str(tmp_path / "r.json"),
                                       "--methods", "prumerge"])
    assert result.exit_code == 0, result.output
    assert "skipped broken.jpg" in result.output and "INT8 vs FP32 (prumerge)" in result.output
    data = json.loads((tmp_path / "r.json").read_text())["prumerge"]
    assert data["calibration_method"] == "minmax" and data["calibration_images"] == 7  # the record a build writes
    data = data["agreement"]
    # the printed line and the JSON report say the same (the numbers themselves are checked in the INT8 build test)
    assert f"mean Jaccard {data['mean_jaccard']:.3f}" in result.output
    assert f"latency fp32/int8 {data['latency_ratio']:.2f}x" in result.output and np.isfinite(data["latency_ratio"])
    assert json.loads((tmp_path / "c.json").read_text())["coverage"] == 0.9


def test_a_target_jaccard_keeps_the_fewest_most_harmful_parts_float():
    """The choice behind ``--int8-target-jaccard``: nothing float when all-INT8 meets the target (one probe); else
    each part measured alone, then the fewest of the most harmful kept float (binary search over how many), listed
    in the tower's order; every part float, said so, when even that misses."""
    from prumerge.calib.sensitivity import choose_float_parts

    harm = {"embeddings": 0.01, "layer 0": 0.08, "layer 1": 0.02, "layer 2": 0.03, "layer 10": 0.05, "layer 11": 0.0}
    seen = []

    def probe(float_parts):
        seen.append(float_parts)
        return 1.0 - sum(h for part, h in harm.items() if part not in float_parts)

    assert choose_float_parts(list(harm), probe, 0.8, log=lambda m: None).parts == [] and len(seen) == 1
    seen.clear()
    choice = choose_float_parts(list(harm), probe, 0.9, log=lambda m: None)
    # all-INT8 1 - 0.19 = 0.81; layer 0 (0.08) float: 0.89; with layer 10 (0.05) too: 0.94
    assert choice.parts == ["layer 0", "layer 10"] and choice.reached == pytest.approx(0.94)
    assert choice.probes == len(seen) <= 1 + len(harm) + 1 + 3  # all, each alone, all float, binary search over 1..6
    assert choice.alone["layer 0"] == pytest.approx(0.92) and choice.sensitivity()[1] == ["layer 0", 0.92]
    assert all(list(p) == sorted(p, key=list(harm).index) for p in seen)  # every probe names parts in tower order
    unreachable = choose_float_parts(list(harm), lambda parts: 0.5, 0.9, log=lambda m: None)
    assert unreachable.parts == list(harm) and unreachable.reached == 0.5


def test_int8_target_jaccard_build_records_its_choice_and_keeps_those_layers_float(llava_dir, folder, tmp_path):
    """A build with a target records the target, each encoder layer's measured agreement alone and the layers kept
    float; no node of a float layer reads a quantised tensor; the agreement reached is the build's own record, and
    it meets the target unless every layer was kept float."""
    import onnx

    images = CalibrationSet.from_folder(folder)
    cal = calibrate_budget(str(llava_dir), images, coverage=0.8).write(tmp_path / "cal.json")
    manifest = build_artifact(str(llava_dir), tmp_path / "t", BuildOptions(
        llm=None, int8=Int8Options(target_jaccard=0.999), calibration=str(cal)))
    record = Manifest.read(tmp_path / "t").vision.int8
    assert record == manifest.vision.int8 and record.target_jaccard == 0.999
    parts = ["embeddings", "layer 0", "layer 1", "layer 2"]  # the tiny tower: patch embedding and three layers
    if record.sensitivity:  # all-INT8 missed the target: every part was measured alone
        assert [part for part, _ in record.sensitivity] == parts
    assert record.agreement.mean_jaccard >= 0.999 or record.float_parts == parts
    graph = onnx.load(str(tmp_path / "t" / "vision.onnx")).graph
    produced_by = {o: n for n in graph.node for o in n.output}
    quantised = {}  # tower part -> does each of its weight MatMuls / Convs read a de-quantised weight
    for node in graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        part = next((f"layer {k}" for k in range(3) if f"encoder.layers.{k}" in scopes),
                    "embeddings" if "patch_embedding" in scopes else None)
        if node.op_type in ("MatMul", "Conv") and part is not None:
            source = produced_by.get(node.input[1])
            quantised.setdefault(part, set()).add(source is not None and source.op_type == "DequantizeLinear")
    assert sorted(quantised) == parts  # layer 2: only the q/k projections selection reads
    for part, kinds in quantised.items():
        assert kinds == ({False} if part in record.float_parts else {True}), (part, kinds)
    assert "kept float for a target Jaccard of 0.999" in record.line()


def test_int8_float_layers_keep_the_selection_path_float(artifact_factory):
    """K = 1 keeps the last encoder layer (its LayerNorm and q/k projections: all that feeds selection after the
    penultimate state) float; K = 2 the layer before too; the sets grow, and only tower nodes are added."""
    import onnx

    path = artifact_factory("llava", "prumerge", "padded") / "vision.onnx"
    sets = [set(float_nodes(path, k)) for k in (0, 1, 2)]
    assert sets[0] < sets[1] < sets[2]
    graph = onnx.load(str(path), load_external_data=False).graph
    scopes = {n.name: next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "") for n in graph.node}
    added = sets[1] - sets[0]
    assert added and all("encoder.layers.2" in scopes[name] for name in added)  # the tiny tower has 3 layers: 0..2
    assert any(graph_node.op_type == "MatMul" for graph_node in graph.node if graph_node.name in added)  # q/k projections
    assert all("encoder.layers.1" in scopes[name] or "encoder.layers.2" in scopes[name] for name in sets[2] - sets[0])


@pytest.mark.parametrize("opset", [17, 18])
def test_per_token_int8_matmul_equals_its_numpy_reference(tmp_path, opset):
    """The per-token form's arithmetic, run by onnxruntime, equals the plain numpy statement of it (integer
    accumulation is exact; only float32 rounding of the two scale products differs); an excluded MatMul stays float."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from prumerge.calib.per_token import quantize_per_token, reference_matmul

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="second")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 4]), helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 5, 6])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(tmp_path / "f.onnx"))
    assert quantize_per_token(tmp_path / "f.onnx", tmp_path / "q.onnx", exclude={"second"}) == 1
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(quantized, full_check=True)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("MatMul") == 1  # "second" excluded: still a float MatMul
    x = rng.normal(size=(2, 5, 8)).astype(np.float32) * np.array([1, 1, 1, 1, 1, 1, 1, 40], np.float32)  # an outlier channel
    x[1, 3] *= 1e-3  # one quiet token: its own scale, not the loud tokens'
    h, y = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(["h", "y"], {"x": x})
    expected = reference_matmul(x, w1)
    np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(y, h @ w2, rtol=1e-5, atol=1e-5)
    exact = x @ w1
    assert np.abs(h[1, 3] - exact[1, 3]).max() < 0.02 * np.abs(exact[1, 3]).max()  # the quiet token keeps its precision


def test_per_token_int8_build_records_its_form_and_measured_agreement(llava_dir, folder, tmp_path):
    """``--calibration-method per-token``: every tower MatMul outside the float set becomes MatMulInteger, the reducer
    stays float, the node stages still attribute the new nodes to the tower, and the recorded agreement is what an
    independent comparison with PyTorch fp32 measures."""
    import onnx
    import torch

    from prumerge import PruMergeEncoder
    from prumerge.artifact.node_stages import classify_nodes
    from prumerge.export.validate import reference_output
    from prumerge.runtime.preprocess import preprocess_batch

    images = CalibrationSet.from_folder(folder)
    cal = calibrate_budget(str(llava_dir), images, coverage=0.8).write(tmp_path / "cal.json")
    manifest = build_artifact(str(llava_dir), tmp_path / "pt", BuildOptions(llm=None, int8=Int8Options(method="per-token"),
                                                                            calibration=str(cal)))
    record = Manifest.read(tmp_path / "pt").vision.int8
    assert record.format == "MatMulInteger" and record.calibration_method == "per-token" and record.calibration_images == 7
    path = tmp_path / "pt" / "vision.onnx"
    graph = onnx.load(str(path)).graph
    stages = classify_nodes(path)
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert integer and all(stages[n.name] in ("vision_encoder", "projector") for n in integer)
    assert not any(n.op_type in ("MatMulInteger", "QuantizeLinear") for n in graph.node if stages.get(n.name) == "reducer")
    encoder = PruMergeEncoder.from_pretrained(llava_dir, method="prumerge", capacity=manifest.vision.capacity)
    pixels = preprocess_batch(images.images, encoder.preprocess_config())
    with torch.no_grad():
        fp32 = reference_output(encoder(torch.from_numpy(pixels)))
    independent = agreement(fp32, VisionSession.open(tmp_path / "pt").run_pixels(pixels))
    assert record.agreement.mean_jaccard == pytest.approx(independent.mean_jaccard, abs=1e-6)
    assert record.agreement.mean_cosine == pytest.approx(independent.mean_cosine, abs=1e-3)
    assert "per-token scales" in dict(manifest.summary_rows())["INT8"]
