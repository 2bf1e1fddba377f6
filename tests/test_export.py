"""ONNX graph vs PyTorch for both contracts and methods, graph checks, and artifact integrity errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from prumerge import PruMergeEncoder
from prumerge.errors import ArtifactError, ExportError, InputError
from prumerge.export.build import build_artifact
from prumerge.export.options import BuildOptions
from prumerge.export.checks import check_onnx, op_support
from prumerge.export.validate import synthetic_pixels
from prumerge.export.verify import inspect_artifact, verify_artifact
from prumerge.runtime import VisionSession

pytestmark = pytest.mark.slow
CASES = [(m, meth, out) for m in ("clip", "llava") for meth in ("prumerge", "prumerge+") for out in ("padded", "dynamic")]


@pytest.mark.parametrize("model,method,output", CASES, ids=["-".join(c) for c in CASES])
def test_onnx_matches_pytorch_on_50_images(artifact_factory, clip_dir, llava_dir, model, method, output):
    directory = artifact_factory(model, method, output)
    session = VisionSession.open(directory)
    encoder = PruMergeEncoder.from_pretrained({"clip": clip_dir, "llava": llava_dir}[model], method=method)
    pixels = synthetic_pixels(50, 112, seed=123)
    got = session.run_pixels(pixels)  # batches of batch_max (16): exercises mixed counts per batch
    with torch.no_grad():
        ref = encoder(torch.from_numpy(pixels))
    assert np.array_equal(got.num_tokens, ref.num_tokens.numpy())
    assert len(set(got.num_tokens.tolist())) > 1, "images should keep different numbers of tokens"
    width = encoder.output_width
    assert got.tokens.shape[-1] == width
    if output == "padded":
        assert got.tokens.shape[1] == encoder.capacity
    else:
        assert got.tokens.shape[1] == got.num_tokens[:16].max() or got.tokens.shape[1] == got.num_tokens.max()
    for b in range(50):
        n = int(got.num_tokens[b])
        assert np.array_equal(got.indices[b, :n], ref.indices[b, :n].numpy())
        np.testing.assert_allclose(got.image(b), ref.tokens[b, :n].numpy(), rtol=0, atol=1e-4)
    # batch 1 through the dynamic contract is exactly [1, n, D]
    one = session.run_pixels(pixels[:1])
    expected_slots = int(one.num_tokens[0]) if output == "dynamic" else encoder.capacity
    assert one.tokens.shape == (1, expected_slots, width)


def test_manifest_records_what_was_built(artifact_factory):
    directory = artifact_factory("llava", "prumerge", "padded")
    info = inspect_artifact(directory)
    assert info["vision"]["capacity"] == 17 and info["reducer"]["num_patches"] == 64
    assert info["vision"]["output_width"] == 64 == info["llm"]["hidden_size"]
    outputs = {o["name"]: o for o in info["vision"]["outputs"]}
    assert outputs["tokens"]["shape"] == ["batch", 17, 64] and outputs["num_tokens"]["dtype"] == "int64"
    padded = info["tensorrt"]["10.3"]
    assert info["validation"]["ok"] and padded["ok"] and not padded["data_dependent"], "padded must pass TensorRT 10.3"
    assert "TopK" in info["graph"]["ops"]
    slim = info["vision"]["simplified"]
    import onnx

    saved = onnx.load(str(directory / "vision.onnx"), load_external_data=False).graph
    unslimmed = onnx.load(str(artifact_factory("llava", "prumerge", "padded", slim=False) / "vision.onnx"), load_external_data=False).graph
    assert slim["applied"] and slim["nodes_after"] == len(saved.node) < slim["nodes_before"] == len(unslimmed.node)
    assert set(info["files"]) == {"vision.onnx"}
    dynamic = inspect_artifact(artifact_factory("llava", "prumerge", "dynamic"))
    assert any(d.startswith("NonZero") for d in dynamic["tensorrt"]["10.3"]["data_dependent"])
    # NonZero is supported since TensorRT 8.5 and IOutputAllocator exists in 10.3: reported, not refused
    assert dynamic["tensorrt"]["10.3"]["ok"] and dynamic["tensorrt"]["10.8"]["ok"]
    assert dynamic["vision"]["outputs"][0]["shape"] == ["batch", "num_tokens_max", 64]


def test_opset_23_fuses_attention_and_keeps_the_selection(artifact_factory):
    """``--opset 23`` writes each full encoder layer's attention as ONNX's fused Attention op (one onnxruntime
    kernel): the same counts and indices as the default plain form, tokens within the fp32 rule; TensorRT's op check
    names what its parser lacks (the default passes it)."""
    import collections

    from prumerge.artifact.manifest import Manifest

    fused_dir = artifact_factory("llava", "prumerge", "padded", opset=23)
    plain_dir = artifact_factory("llava", "prumerge", "padded")
    fused, plain = (Manifest.read(d).vision for d in (fused_dir, plain_dir))
    assert (fused.opset, fused.attention, plain.opset, plain.attention) == (23, "fused", 18, "plain")

    def ops(directory):
        return collections.Counter(n.op_type for n in onnx.load(str(directory / "vision.onnx")).graph.node)

    # the tiny tower's layers 0 and 1; the last layer is only the q/k projections PruMerge reads
    assert ops(fused_dir)["Attention"] == 2 and ops(plain_dir)["Attention"] == 0
    assert plain.tensorrt["10.3"].ok and fused.tensorrt["10.3"].unsupported == ["Attention"]
    assert fused.tensorrt["10.3"].violations == ["opset 23 is newer than TensorRT 10.3 parses (20)"]
    pixels = synthetic_pixels(16, 112, seed=7)
    a, b = (VisionSession.open(d).run_pixels(pixels) for d in (fused_dir, plain_dir))
    assert np.array_equal(a.num_tokens, b.num_tokens) and np.array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.tokens, b.tokens, rtol=0, atol=1e-4)


def test_an_onnxruntime_too_old_for_fused_attention_is_told_to_rebuild(artifact_factory, monkeypatch):
    """The device install allows onnxruntime 1.20; the fused Attention op (``--opset 23``) needs 1.23: one line naming
    both ways out, before onnxruntime's own missing-kernel message. The default plain form opens on any of them."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.22.1")
    with pytest.raises(ArtifactError, match=r"onnxruntime 1\.22\.1 cannot run .*rebuild the artifact with --opset 18"):
        VisionSession.open(artifact_factory("llava", "prumerge", "padded", opset=23))
    VisionSession.open(artifact_factory("llava", "prumerge", "padded"))


def test_verify_passes_and_reports(artifact_factory):
    report = verify_artifact(artifact_factory("clip", "prumerge+", "dynamic"), images=3)
    assert report["reference"]["ok"] and report["hashes"] == "ok"


def test_method_none_baseline_artifact(artifact_factory, llava_dir):
    directory = artifact_factory("llava", "none", "padded")
    out = VisionSession.open(directory).run_pixels(synthetic_pixels(2, 112))
    assert out.num_tokens.tolist() == [64, 64] and out.tokens.shape == (2, 64, 64)


def test_small_capacity_truncates_and_says_so(artifact_factory):
    directory = artifact_factory("llava", "prumerge+", "padded", max_tokens=3)
    out = VisionSession.open(directory).run_pixels(synthetic_pixels(6, 112))
    assert out.tokens.shape[1] == 3 and (out.num_tokens <= 3).all() and out.truncated.any()
    from prumerge.export.verify import verify_artifact

    assert verify_artifact(directory, images=6)["reference"]["ok"]  # the reference is rebuilt at the graph's capacity


def test_fp16_export_runs(artifact_factory):
    directory = artifact_factory("clip", "prumerge", "padded", fp16=True)
    session = VisionSession.open(directory)
    assert session.manifest.vision.precision == "fp16"
    out = session.run_pixels(synthetic_pixels(2, 112))
    assert out.tokens.dtype == np.float16


# --------------------------------------------------------------------------------------------- graph checks
def _graph(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_op_support_flags_unsupported_ops_and_restrictions():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    unique = _graph([helper.make_node("Unique", ["x"], ["y"])], [x], [y])
    report = op_support(unique)
    assert not report.ok and report.unsupported == ["Unique"] and "NOT compatible" in report.summary()

    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    vals = helper.make_tensor_value_info("v", TensorProto.FLOAT, [None])
    idx = helper.make_tensor_value_info("i", TensorProto.INT64, [None])
    dynamic_k = _graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")], [x, k], [vals, idx])
    assert op_support(dynamic_k).ok  # a dynamic K is supported since TensorRT 8.6 (onnx-tensorrt operators.md)
    big_k = _graph([helper.make_node("TopK", ["x", "K"], ["v", "i"], name="topk")], [x], [vals, idx],
                   [helper.make_tensor("K", TensorProto.INT64, [1], [5000])])
    assert any("below 3840" in v for v in op_support(big_k).violations)
    custom = _graph([helper.make_node("Foo", ["x"], ["y"], domain="com.example")], [x], [y])
    assert op_support(custom).unsupported == ["com.example::Foo"]
    # ops added after 10.3 are flagged for 10.3 only
    window = _graph([helper.make_node("HannWindow", ["k"], ["y"])], [k], [y])
    assert op_support(window, "10.3").unsupported == ["HannWindow"] and op_support(window, "10.8").ok


def test_checker_rejects_broken_graph(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    bad = _graph([helper.make_node("Relu", ["missing"], ["y"])], [x], [y])
    path = tmp_path / "bad.onnx"
    onnx.save(bad, path)
    with pytest.raises(ExportError, match="fails the ONNX checker"):
        check_onnx(path)


# ---------------------------------------------------------------------------------------- artifact integrity
@pytest.fixture
def artifact_copy(artifact_factory, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact_factory("llava", "prumerge", "padded"), target)
    return target


def test_truncated_graph_is_refused(artifact_copy):
    path = artifact_copy / "vision.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="vision.onnx has .* bytes"):
        VisionSession.open(artifact_copy)


def test_corrupted_graph_same_size_is_refused(artifact_copy):
    path = artifact_copy / "vision.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        VisionSession.open(artifact_copy)
    # without re-hashing, a byte flip inside the weights would load silently (that is what the hashes are for);
    # a file that is not a graph at all still fails with one clear message
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ArtifactError, match="onnxruntime cannot load"):
        VisionSession.open(artifact_copy, verify=False)


def test_edited_manifest_is_refused(artifact_copy):
    path = artifact_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["reducer"]["capacity"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="edited after the build"):
        VisionSession.open(artifact_copy)
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        VisionSession.open(artifact_copy)


def test_missing_files_are_refused(artifact_copy, tmp_path):
    (artifact_copy / "vision.onnx").unlink()
    with pytest.raises(ArtifactError, match="artifact file missing: .*vision.onnx"):
        VisionSession.open(artifact_copy)
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        VisionSession.open(artifact_copy)
    with pytest.raises(ArtifactError, match="not found"):
        VisionSession.open(tmp_path / "nope")


def test_wrong_inputs_are_clear_errors(artifact_factory):
    session = VisionSession.open(artifact_factory("llava", "prumerge", "padded"))
    with pytest.raises(InputError, match=r"shape \[batch, 3, 112, 112\]"):
        session.run_pixels(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(InputError, match="numpy array"):
        session.run_pixels([[0.0]])
    with pytest.raises(InputError, match="NaN or Inf"):
        session.run_pixels(np.full((1, 3, 112, 112), np.nan, np.float32))
    with pytest.raises(InputError, match="unsupported image type"):
        session.run(3.14)


def test_a_bare_graph_file_runs_through_the_same_session(artifact_factory):
    """Build validation and INT8 comparison open the graph file alone: same binding, checks and batch splitting
    as the artifact's session (outputs equal), no preprocessing config to run images with."""
    from prumerge.artifact.manifest import Manifest, inside

    directory = artifact_factory("llava", "prumerge", "padded")
    artifact = VisionSession.open(directory)
    bare = VisionSession.from_graph(inside(directory, Manifest.read(directory).vision.file), batch_max=2)
    pixels = np.random.default_rng(0).normal(size=(5, 3, 112, 112)).astype(np.float32)
    mine, theirs = bare.run_pixels(pixels), artifact.run_pixels(pixels)
    assert all(np.array_equal(getattr(mine, k), getattr(theirs, k)) for k in ("tokens", "num_tokens", "indices", "truncated"))
    with pytest.raises(InputError, match="NaN or Inf"):
        bare.run_pixels(np.full((1, 3, 112, 112), np.nan, np.float32))
    with pytest.raises(InputError, match="no preprocessing config"):
        bare.run([np.zeros((8, 8, 3), np.uint8)])


def test_existing_dir_and_failed_build_leave_nothing(tmp_path, llava_dir, monkeypatch):
    out = tmp_path / "art"
    out.mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        build_artifact(str(llava_dir), out, BuildOptions())

    import prumerge.export.graph as graph

    def boom(*args, **kwargs):
        raise ExportError("simulated exporter crash")

    monkeypatch.setattr(graph, "export_onnx", boom)
    target = tmp_path / "never"
    with pytest.raises(ExportError, match="simulated"):
        build_artifact(str(llava_dir), target, BuildOptions())
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["art"], "no partial staging directory may remain"
