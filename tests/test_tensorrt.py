"""TensorRT path: what runs without TensorRT is checked here; engine builds and GPU parity skip with a reason."""

from __future__ import annotations

import importlib.util
import json
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from prumerge.artifact.manifest import TensorSpec
from prumerge.cli import main
from prumerge.errors import ArtifactError, BackendUnavailableError, ConfigError
from prumerge.export.build import build_artifact
from prumerge.export.options import BuildOptions, GraphOptions
from prumerge.export.tensorrt import (
    EngineOptions,
    build_engine,
    engine_mismatch,
    fp32_layer_patterns,
    keep_fp32,
    optimization_profile,
    pinnable,
    precision_plan,
    trtexec_command,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
INPUTS = [TensorSpec("pixel_values", "float32", ["batch", 3, 336, 336])]


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
        optimization_profile([TensorSpec("x", "float32", ["batch", 3, "h", 336])], EngineOptions())
    with pytest.raises(ConfigError, match="only a leading 'batch' axis"):
        optimization_profile([TensorSpec("x", "float32", ["question_rows", "batch", 4])], EngineOptions())
    for bad in (dict(opt_question_rows=0), dict(opt_question_rows=9, max_question_rows=8), dict(max_question_rows=5000)):
        with pytest.raises(ConfigError, match="question rows profile"):
            EngineOptions(**bad)


STRONG = {"strongly_typed": True, "fp16": False, "pin_fp32": False}
WEAK_FP16 = {"strongly_typed": False, "fp16": True, "pin_fp32": True}


def test_precision_plan():
    """Strongly typed wherever the graph carries the precisions (fp16 graph, Q/DQ graph, fp32); weakly typed FP16
    only from an fp32 graph on TensorRT 10.x; TensorRT 11 (no weak typing) refuses it with the way out."""
    assert precision_plan(EngineOptions(precision="fp16"), "fp16", False, "10.3.0") == STRONG
    assert precision_plan(EngineOptions(precision="fp16"), "fp16", False, "11.0.0") == STRONG
    assert precision_plan(EngineOptions(precision="fp32"), "fp32", False, "10.8.0") == STRONG
    assert precision_plan(EngineOptions(precision="int8"), "int8", True, "10.3.0") == STRONG
    assert precision_plan(EngineOptions(precision="fp16"), "fp32", False, "10.3.0") == WEAK_FP16
    with pytest.raises(ConfigError, match="TensorRT 11 builds strongly typed networks only: export the graph with --fp16"):
        precision_plan(EngineOptions(precision="fp16"), "fp32", False, "11.0.0")
    with pytest.raises(ConfigError, match="explicit Q/DQ graph"):
        precision_plan(EngineOptions(precision="int8"), "fp32", False)
    with pytest.raises(ConfigError, match="without --fp16"):
        precision_plan(EngineOptions(precision="fp32"), "fp16", False)


def test_fp32_layer_selection():
    stages = {"node_topk_3": "reducer", "node_MatMul_1": "vision_encoder"}
    assert keep_fp32("node_topk_3", stages) and keep_fp32("node_topk_3_1", stages)
    assert keep_fp32("/encoder/Softmax_12", stages) and keep_fp32("node_LayerNormalization_4", stages)
    assert not keep_fp32("node_MatMul_1", stages)
    # only float compute layers carry a precision: constants, shapes, data movement and int/bool layers are skipped
    assert pinnable("MATRIX_MULTIPLY", ["FLOAT"]) and pinnable("SOFTMAX", ["HALF"])
    for layer_type, dtypes in (("CONSTANT", ["FLOAT"]), ("SHAPE", ["INT64"]), ("TOPK", ["FLOAT", "INT32"]),
                               ("ELEMENTWISE", ["BOOL"]), ("CAST", ["FLOAT"])):
        assert not pinnable(layer_type, dtypes), layer_type


def test_tensorrt_names_match_the_documented_api():
    """The TensorRT names the code uses, checked against TensorRT's Python API as documented for 10.3-11 (read
    from the bindings where TensorRT is installed)."""
    import ast
    import inspect

    import prumerge.export.tensorrt as module
    import prumerge.runtime.tensorrt as runtime

    used = {node.attr for src in (module, runtime) for node in ast.walk(ast.parse(inspect.getsource(src)))
            if isinstance(node, ast.Attribute)}
    assert {"MemoryPoolType", "WORKSPACE", "float32"} <= used
    # deprecated since 10.12 and absent from TensorRT 11: none on the default paths
    assert not used & {"BuilderFlag", "OBEY_PRECISION_CONSTRAINTS", "reallocate_output", "NetworkDefinitionCreationFlag"}
    assert "cudaMalloc" not in used  # device memory belongs to polygraphy's runner
    if HAS_TRT:  # pragma: no cover - with TensorRT
        import tensorrt as trt

        assert trt.MemoryPoolType.WORKSPACE is not None and trt.float32 is not None


# trtexec's option grammar as its --help documents it (TensorRT 10.x): the options this project writes, and the
# value syntax of each. A spec trtexec would reject fails here.
TRTEXEC_OPTIONS = {
    "onnx": r"[^\s]+\.onnx", "saveEngine": r"[^\s]+", "timingCacheFile": r"[^\s]+",
    "minShapes": r"SHAPES", "optShapes": r"SHAPES", "maxShapes": r"SHAPES",
    "memPoolSize": r"(workspace|dlaSRAM|dlaLocalDRAM|dlaGlobalDRAM|tacticSharedMem):\d+(\.\d+)?[KMG]?",
    "fp16": None, "stronglyTyped": None, "noTF32": None, "precisionConstraints": r"(none|prefer|obey)",
    "layerPrecisions": r"LAYERPRECISIONS",
}


def parse_trtexec(cmd: list) -> dict:
    import re

    shape = r"[A-Za-z_][\w./:-]*?:\d+(x\d+)*"
    parsed = {}
    assert cmd[0].endswith("trtexec")
    for arg in cmd[1:]:
        match = re.fullmatch(r"--(\w+)(=(.*))?", arg)
        assert match, f"not a trtexec option: {arg}"
        name, value = match.group(1), match.group(3)
        assert name in TRTEXEC_OPTIONS, f"unknown trtexec option --{name}"
        grammar = TRTEXEC_OPTIONS[name]
        if grammar is None:
            assert value is None, f"--{name} takes no value"
        elif grammar == "SHAPES":
            assert re.fullmatch(f"{shape}(,{shape})*", value), f"bad shape spec {value}"
        elif grammar == "LAYERPRECISIONS":
            for spec in value.split(","):
                layer, _, precision = spec.rpartition(":")
                assert layer and precision in ("fp32", "fp16", "bf16", "int8", "fp8", "int4", "int32", "int64")
                assert layer.count("*") <= 1, f"trtexec allows one wildcard per layer name: {layer}"
        else:
            assert re.fullmatch(grammar, value), f"--{name}={value}"
        parsed[name] = value
    return parsed


def test_trtexec_command_line_follows_the_grammar():
    options = EngineOptions.for_target("jetson-orin-nano", timing_cache="cache.bin")
    strong = parse_trtexec(trtexec_command("vision.onnx", "vision.engine", INPUTS, options, STRONG))
    assert strong["minShapes"] == strong["maxShapes"] == "pixel_values:1x3x336x336"
    assert strong["memPoolSize"] == "workspace:512M" and "stronglyTyped" in strong and "fp16" not in strong
    stages = {"node_TopK_7": "reducer", "node_Softmax_2": "vision_encoder", "node_CumSum_3": "reducer"}
    weak = parse_trtexec(trtexec_command("vision.onnx", "vision.engine", INPUTS, EngineOptions(), WEAK_FP16, stages))
    assert "fp16" in weak and weak["precisionConstraints"] == "obey" and "stronglyTyped" not in weak
    assert "noTF32" in strong and "noTF32" in weak  # as polygraphy's build: TF32 moves selection on real weights
    assert weak["layerPrecisions"] == "node_CumSum_3*:fp32,node_TopK_7*:fp32" == ",".join(f"{p}:fp32" for p in fp32_layer_patterns(stages))
    with pytest.raises(AssertionError, match="one wildcard"):  # the old pattern, which trtexec rejects
        parse_trtexec(["trtexec", "--layerPrecisions=*Softmax*:fp32"])


def test_polygraphy_carries_the_build():
    """polygraphy is installed here: the loader chain is built (lazily) with the plan's settings."""
    pytest.importorskip("polygraphy")
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath

    from prumerge.export import tensorrt as module

    if HAS_TRT:  # pragma: no cover
        loader = module.polygraphy_build(__import__("pathlib").Path("v.onnx"), INPUTS, EngineOptions(), STRONG)
    else:  # the workspace limit is a TensorRT enum; stand in for it to inspect the chain
        original = module._workspace
        module._workspace = lambda options: {"WORKSPACE": options.workspace_mib << 20}
        try:
            loader = module.polygraphy_build(__import__("pathlib").Path("v.onnx"), INPUTS,
                                             EngineOptions(max_batch=4, timing_cache="t.cache"), STRONG)
        finally:
            module._workspace = original
    assert isinstance(loader, EngineBytesFromNetwork) and isinstance(loader._network, NetworkFromOnnxPath)
    assert loader._network.strongly_typed is True and loader.timing_cache_path in ("t.cache", None)
    config = loader._config
    profile = config.profiles[0]
    assert tuple(profile["pixel_values"].max) == (4, 3, 336, 336) or HAS_TRT
    assert not config.fp16 and config.precision_constraints is None
    assert config.tf32 is False  # polygraphy clears TensorRT's default-on TF32 flag only when tf32 is False


def test_engine_mismatch_names_both_sides():
    built = {"tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    assert engine_mismatch(built, dict(built)) is None
    message = engine_mismatch(built, {"tensorrt_version": "10.8.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"})
    assert "10.3.0" in message and "10.8.0" in message and "Orin" in message and "H100" in message


@pytest.mark.slow
def test_jetson_build_writes_the_script(llava_dir, tmp_path):
    out = tmp_path / "jetson"
    manifest = build_artifact(str(llava_dir), out, BuildOptions(graph=GraphOptions(batch_max=2), llm=None, engine=EngineOptions.for_target("jetson-orin-nano")))
    script = out / "build_engine.sh"
    text = script.read_text()
    assert script.stat().st_mode & stat.S_IXUSR and "build_engine.sh" in manifest.files
    assert "--minShapes=pixel_values:1x3x112x112" in text and "--memPoolSize=workspace:512M" in text
    assert "prumerge-export engine . --target jetson-orin-nano --precision fp16 --workspace 512" in text
    assert manifest.vision.tensorrt_target.max_batch == 1 and manifest.vision.tensorrt["10.3"].ok
    # an fp32 graph gets a weakly typed FP16 engine (TensorRT 10.x) with the reducer pinned by explicit names
    assert manifest.vision.tensorrt_target.plan == WEAK_FP16
    trtexec_line = next(line for line in text.splitlines() if "exec \"$TRTEXEC\"" in line)
    parse_trtexec(["trtexec", *__import__("shlex").split(trtexec_line.split('"$TRTEXEC"', 1)[1])])
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "trtexec").write_text("#!/bin/sh\necho \"$@\" > trtexec.args\n")
    (fake / "trtexec").chmod(0o755)
    env = {**__import__("os").environ, "PATH": f"{fake}:{__import__('os').environ['PATH']}"}
    subprocess.run(["bash", str(script), "--trtexec"], check=True, env=env)  # the trtexec line really runs
    assert (out / "trtexec.args").read_text().startswith("--onnx=vision.onnx --saveEngine=vision.engine")
    fp16 = build_artifact(str(llava_dir), tmp_path / "fp16", BuildOptions(graph=GraphOptions(fp16=True, batch_max=2), llm=None,
                                                                         engine=EngineOptions.for_target("jetson-orin")))
    assert fp16.vision.tensorrt_target.plan == STRONG  # the --fp16 graph carries its own precisions
    with pytest.raises(ConfigError, match="exceeds the graph's exported limit"):
        build_artifact(str(llava_dir), tmp_path / "y", BuildOptions(graph=GraphOptions(batch_max=2), llm=None,
                                                                    engine=EngineOptions.for_target("server", max_batch=8)))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_engine_without_tensorrt_is_one_clear_error(artifact_factory, tmp_path):
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        build_engine(tmp_path / "v.onnx", tmp_path / "v.engine", INPUTS, EngineOptions())
    result = CliRunner().invoke(main, ["engine", str(artifact_factory("llava", "prumerge", "padded")), "--target", "server"])
    assert result.exit_code == 8 and "TensorRT is not installed" in result.output
    # a graph built with fused attention (--opset 23): refused in one line, before TensorRT is looked for
    result = CliRunner().invoke(main, ["engine", str(artifact_factory("llava", "prumerge", "padded", opset=23)),
                                       "--target", "server"])
    assert result.exit_code not in (0, 1) and "rebuild it for TensorRT with --target (or --opset 18)" in result.output
    assert "Traceback" not in result.output


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


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (its PyPI wheels download from a host this machine cannot reach)")
@pytest.mark.parametrize("output,fp16", [("padded", False), ("dynamic", False), ("padded", True)])
def test_engine_contracts_and_precisions(artifact_factory, tmp_path, output, fp16):  # pragma: no cover - GPU
    """Padded and dynamic contracts, FP32 and strongly typed FP16: counts and indices as onnxruntime's; a second
    build reuses the timing cache; an engine recorded for another GPU is refused."""
    import json as _json
    import shutil
    import time

    from prumerge.artifact.manifest import Manifest, _self_hash
    from prumerge.export.tensorrt import add_engine_to_artifact
    from prumerge.export.validate import synthetic_pixels
    from prumerge.runtime import VisionSession

    directory = tmp_path / "a"
    shutil.copytree(artifact_factory("llava", "prumerge+", output, fp16=fp16), directory)
    cache = tmp_path / "timing.cache"
    options = EngineOptions.for_target("server", precision="fp16" if fp16 else "fp32", max_batch=4, timing_cache=str(cache))
    start = time.perf_counter()
    facts = add_engine_to_artifact(directory, options)
    first = time.perf_counter() - start
    assert facts["plan"]["strongly_typed"] and cache.is_file()
    pixels = synthetic_pixels(8, 112)
    ref = VisionSession.open(directory).run_pixels(pixels.astype(np.float16) if fp16 else pixels)
    with VisionSession.open(directory, provider="tensorrt") as trt_session:
        got = trt_session.run_pixels(pixels)
    assert np.array_equal(ref.num_tokens, got.num_tokens) and np.array_equal(ref.indices, got.indices)
    np.testing.assert_allclose(ref.tokens.astype(np.float32), got.tokens.astype(np.float32), atol=5e-2 if fp16 else 1e-3)
    start = time.perf_counter()
    add_engine_to_artifact(directory, options)
    print(_json.dumps({"output": output, "fp16": fp16, "build_s": first, "rebuild_with_cache_s": time.perf_counter() - start}))
    path = directory / "manifest.json"
    data = _json.loads(path.read_text())
    data["vision"]["engine"]["gpu"] = "some other GPU"
    data.pop("manifest_sha256")
    data["manifest_sha256"] = _self_hash(data)
    path.write_text(_json.dumps(data))
    with pytest.raises(ArtifactError, match="cannot run here: .*some other GPU"):
        VisionSession.open(directory, provider="tensorrt")
    assert Manifest.read(directory).vision.engine.gpu == "some other GPU"


def test_gpu_check_runs_and_says_why_it_skips():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    if "no GPU here" in result.stdout:
        assert "nvidia-smi" in result.stdout
    else:  # pragma: no cover - on a GPU machine
        assert "GPU check report" in result.stdout
