"""TensorRT path: what runs without TensorRT is checked here; engine builds and GPU parity skip with a reason."""

from __future__ import annotations

import importlib.util
import json
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from prumerge.cli import main
from prumerge.errors import ArtifactError, BackendUnavailableError, ConfigError
from prumerge.export.build import BuildOptions, build_artifact
from prumerge.export.tensorrt import (
    EngineOptions,
    build_engine,
    builder_flags,
    engine_mismatch,
    keep_fp32,
    optimization_profile,
    trtexec_command,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
INPUTS = [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 336, 336]}]


def test_target_defaults_and_validation():
    nano = EngineOptions.for_target("jetson-orin-nano")
    assert (nano.precision, nano.workspace_mib, nano.max_batch) == ("fp16", 512, 1)
    assert EngineOptions.for_target("jetson-orin").workspace_mib == 2048
    server = EngineOptions.for_target("server", max_batch=4, precision="fp32")
    assert (server.max_batch, server.precision) == (4, "fp32")
    for bad in (dict(target="xavier"), dict(precision="int4"), dict(min_batch=2, opt_batch=1), dict(workspace_mib=1)):
        with pytest.raises(ConfigError):
            EngineOptions(**bad)


def test_optimization_profile():
    profile = optimization_profile(INPUTS, EngineOptions(min_batch=1, opt_batch=2, max_batch=4))
    assert profile == {"pixel_values": ((1, 3, 336, 336), (2, 3, 336, 336), (4, 3, 336, 336))}
    with pytest.raises(ConfigError, match="only a leading 'batch' axis"):
        optimization_profile([{"name": "x", "dtype": "float32", "shape": ["batch", 3, "h", 336]}], EngineOptions())


def test_builder_flags():
    assert builder_flags(EngineOptions(precision="fp16"), False) == {"network": [], "builder": ["FP16", "OBEY_PRECISION_CONSTRAINTS"]}
    assert builder_flags(EngineOptions(precision="fp32"), False) == {"network": [], "builder": []}
    assert builder_flags(EngineOptions(precision="int8"), True) == {"network": ["STRONGLY_TYPED"], "builder": []}
    with pytest.raises(ConfigError, match="explicit Q/DQ graph"):
        builder_flags(EngineOptions(precision="int8"), False)


def test_fp32_layer_selection():
    stages = {"node_topk_3": "reducer", "node_MatMul_1": "vision_encoder"}
    assert keep_fp32("node_topk_3", stages) and keep_fp32("node_topk_3_1", stages)
    assert keep_fp32("/encoder/Softmax_12", stages) and keep_fp32("node_LayerNormalization_4", stages)
    assert not keep_fp32("node_MatMul_1", stages)


def test_trtexec_command_line():
    options = EngineOptions.for_target("jetson-orin-nano", timing_cache="cache.bin")
    cmd = trtexec_command("vision.onnx", "vision.engine", INPUTS, options)
    assert cmd[:3] == ["trtexec", "--onnx=vision.onnx", "--saveEngine=vision.engine"]
    for arg in ("--minShapes=pixel_values:1x3x336x336", "--optShapes=pixel_values:1x3x336x336",
                "--maxShapes=pixel_values:1x3x336x336", "--memPoolSize=workspace:512M", "--fp16",
                "--precisionConstraints=obey", "--timingCacheFile=cache.bin"):
        assert arg in cmd
    assert "--stronglyTyped" in trtexec_command("v.onnx", "v.engine", INPUTS, EngineOptions(precision="int8"))


def test_engine_mismatch_names_both_sides():
    built = {"tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    assert engine_mismatch(built, dict(built)) is None
    message = engine_mismatch(built, {"tensorrt_version": "10.8.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"})
    assert "10.3.0" in message and "10.8.0" in message and "Orin" in message and "H100" in message


@pytest.mark.slow
def test_jetson_build_writes_the_script(llava_dir, tmp_path):
    out = tmp_path / "jetson"
    manifest = build_artifact(str(llava_dir), out, BuildOptions(target="jetson-orin-nano", llm_precision=None, batch_max=2))
    script = out / "build_engine.sh"
    text = script.read_text()
    assert script.stat().st_mode & stat.S_IXUSR and "build_engine.sh" in manifest.files
    assert "--minShapes=pixel_values:1x3x112x112" in text and "--memPoolSize=workspace:512M" in text
    assert "prumerge-export engine . --target jetson-orin-nano --precision fp16 --workspace 512" in text
    assert manifest.vision["tensorrt_target"]["max_batch"] == 1 and manifest.vision["tensorrt"]["10.3"]["ok"]
    with pytest.raises(ConfigError, match="needs --output padded"):
        build_artifact(str(llava_dir), tmp_path / "x", BuildOptions(target="jetson-orin", output="dynamic", llm_precision=None))
    with pytest.raises(ConfigError, match="exceeds the graph's exported limit"):
        build_artifact(str(llava_dir), tmp_path / "y", BuildOptions(target="server", batch_max=2, llm_precision=None,
                                                                    engine_options={"max_batch": 8}))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_engine_without_tensorrt_is_one_clear_error(artifact_factory, tmp_path):
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        build_engine(tmp_path / "v.onnx", tmp_path / "v.engine", INPUTS, EngineOptions())
    result = CliRunner().invoke(main, ["engine", str(artifact_factory("llava", "prumerge", "padded")), "--target", "server"])
    assert result.exit_code == 8 and "TensorRT is not installed" in result.output


def test_tensorrt_provider_without_engine_or_tensorrt(artifact_factory):
    from prumerge.runtime.tensorrt import TensorRTSession
    from prumerge.artifact.manifest import Manifest

    directory = artifact_factory("llava", "prumerge", "padded")
    manifest = Manifest.read(directory)
    if HAS_TRT:  # TensorRT present: the artifact has no engine, and says how to build one
        with pytest.raises(ArtifactError, match="has no TensorRT engine; build one on this device"):
            TensorRTSession(directory, manifest, manifest.vision)
    else:
        with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
            TensorRTSession(directory, manifest, manifest.vision)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (its PyPI wheels download from a host this machine cannot reach)")
def test_engine_build_and_parity(artifact_factory, tmp_path):  # pragma: no cover - needs TensorRT and a GPU
    import shutil

    from prumerge.export.tensorrt import add_engine_to_artifact
    from prumerge.export.validate import synthetic_pixels
    from prumerge.runtime import VisionSession

    directory = tmp_path / "a"
    shutil.copytree(artifact_factory("llava", "prumerge", "padded"), directory)
    add_engine_to_artifact(directory, EngineOptions.for_target("server", precision="fp32", max_batch=4))
    pixels = synthetic_pixels(8, 112)
    ref = VisionSession.open(directory).run_pixels(pixels)
    got = VisionSession.open(directory, provider="tensorrt").run_pixels(pixels)
    assert np.array_equal(ref.num_tokens, got.num_tokens) and np.array_equal(ref.indices, got.indices)
    np.testing.assert_allclose(ref.tokens, got.tokens, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="no CUDA execution provider (onnxruntime-gpu on a CUDA machine)")
@pytest.mark.parametrize("method,output", [("prumerge", "padded"), ("prumerge+", "dynamic")])
def test_onnxruntime_cuda_parity(artifact_factory, method, output):  # pragma: no cover - needs a GPU
    from prumerge.export.validate import synthetic_pixels
    from prumerge.runtime import VisionSession

    directory = artifact_factory("llava", method, output)
    pixels = synthetic_pixels(50, 112, seed=5)
    cpu = VisionSession.open(directory).run_pixels(pixels)
    gpu = VisionSession.open(directory, provider="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    out = gpu.run_pixels(pixels)
    assert np.array_equal(cpu.num_tokens, out.num_tokens) and np.array_equal(cpu.indices, out.indices)
    np.testing.assert_allclose(cpu.tokens, out.tokens, atol=1e-4)
    print(json.dumps({"method": method, "max_abs": float(np.abs(cpu.tokens - out.tokens).max())}))
