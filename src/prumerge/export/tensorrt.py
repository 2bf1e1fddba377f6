"""TensorRT engines from an artifact's ``vision.onnx``: builder, Jetson targets, ``build_engine.sh``.

Engines are specific to one GPU and one TensorRT version, so on Jetson they must be built on the device itself:
every artifact can carry ``build_engine.sh`` with the exact ``trtexec`` command and the equivalent
``prumerge-export engine DIR``. The builder keeps the reducer's layers, Softmax and LayerNorm in FP32 under FP16
(token selection compares attention scores; FP16 would move the outlier threshold) and builds INT8 only from an
explicit Q/DQ graph (strongly typed network), since TensorRT's implicit INT8 calibrators are deprecated.

Everything that needs no TensorRT (targets, profiles, flags, the trtexec line, compatibility facts) is plain
Python, so it is unit-tested without a GPU; :func:`build_engine` imports ``tensorrt`` only when called.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from pathlib import Path

from ..artifact.engine import ENGINE_FILE, device_facts, engine_mismatch  # noqa: F401  (re-exported)
from ..errors import BackendUnavailableError, ConfigError, ExportError

SCRIPT_FILE = "build_engine.sh"
PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("server", "jetson-orin", "jetson-orin-nano")


class EngineBuildError(ExportError):
    """TensorRT could not parse or build the graph."""


@dataclasses.dataclass
class EngineOptions:
    target: str = "server"
    precision: str = "fp16"
    workspace_mib: int = 4096
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; choose one of: {', '.join(TARGETS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown engine precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.workspace_mib < 16:
            raise ConfigError(f"workspace must be at least 16 MiB, got {self.workspace_mib}")

    @classmethod
    def for_target(cls, target: str, **overrides) -> "EngineOptions":
        """Safe defaults per device: Jetson engines are batch 1 FP16 with a workspace that fits beside the LLM
        (8 GB Orin Nano shares its memory between CPU, GPU and the language model)."""
        defaults = {
            "server": dict(precision="fp16", workspace_mib=4096, min_batch=1, opt_batch=1, max_batch=8),
            "jetson-orin": dict(precision="fp16", workspace_mib=2048, min_batch=1, opt_batch=1, max_batch=1),
            "jetson-orin-nano": dict(precision="fp16", workspace_mib=512, min_batch=1, opt_batch=1, max_batch=1),
        }
        if target not in defaults:
            raise ConfigError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
        return cls(target=target, **{**defaults[target], **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def required_contract(target: str) -> str | None:
    """Jetson (JetPack 6, TensorRT 10.3) needs the padded contract: no data-dependent shapes."""
    return "padded" if target.startswith("jetson") else None


def optimization_profile(inputs: list, options: EngineOptions) -> dict:
    """``{input name: (min, opt, max) shapes}`` for the batch axis; refuses unknown or extra dynamic axes."""
    profile = {}
    for spec in inputs:
        shape = spec["shape"]
        dynamic = [i for i, d in enumerate(shape) if isinstance(d, str)]
        if dynamic != [0] or shape[0] != "batch":
            raise ConfigError(f"input {spec['name']} has dynamic axes {dynamic}; only a leading 'batch' axis is supported")
        rest = tuple(int(d) for d in shape[1:])
        profile[spec["name"]] = tuple((b, *rest) for b in (options.min_batch, options.opt_batch, options.max_batch))
    return profile


def check_batch(options: EngineOptions, batch_max: int) -> None:
    if options.max_batch > batch_max:
        raise ConfigError(f"engine max batch {options.max_batch} exceeds the graph's exported limit {batch_max}")


def builder_flags(options: EngineOptions, has_qdq: bool) -> dict:
    """Network and builder flags by name: INT8 is a strongly typed build of a Q/DQ graph; FP16 keeps the
    constrained layers in FP32 (OBEY_PRECISION_CONSTRAINTS)."""
    if options.precision == "int8":
        if not has_qdq:
            raise ConfigError("INT8 engines are built from an explicit Q/DQ graph (prumerge-export calibrate + build "
                              "--precision int8); TensorRT's implicit INT8 calibration is deprecated")
        return {"network": ["STRONGLY_TYPED"], "builder": []}
    if options.precision == "fp16":
        return {"network": [], "builder": ["FP16", "OBEY_PRECISION_CONSTRAINTS"]}
    return {"network": [], "builder": []}


def keep_fp32(layer_name: str, op_stage: dict) -> bool:
    """Layers that stay FP32 under FP16: everything traced from the reducer, plus softmax / normalisation."""
    lowered = layer_name.lower()
    if any(word in lowered for word in ("softmax", "layernorm", "layer_norm", "layernormalization", "reducel2")):
        return True
    name = layer_name.split(" ")[0]
    for node, stage in op_stage.items():
        if stage == "reducer" and (name == node or name.startswith(node + "_") or name.startswith(node + ".")):
            return True
    return False


def _shape_arg(profile: dict, index: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[index]))}" for name, shapes in profile.items())


def trtexec_command(onnx_file: str, engine_file: str, inputs: list, options: EngineOptions, trtexec: str = "trtexec") -> list:
    """The ``trtexec`` argument list equivalent to :func:`build_engine` (what ``build_engine.sh`` runs)."""
    profile = optimization_profile(inputs, options)
    cmd = [trtexec, f"--onnx={onnx_file}", f"--saveEngine={engine_file}", f"--minShapes={_shape_arg(profile, 0)}",
           f"--optShapes={_shape_arg(profile, 1)}", f"--maxShapes={_shape_arg(profile, 2)}",
           f"--memPoolSize=workspace:{options.workspace_mib}M"]
    if options.precision == "fp16":
        cmd += ["--fp16", "--precisionConstraints=obey", "--layerPrecisions=*Softmax*:fp32,*LayerNorm*:fp32"]
    elif options.precision == "int8":
        cmd += ["--stronglyTyped"]
    if options.timing_cache:
        cmd += [f"--timingCacheFile={options.timing_cache}"]
    return cmd


def build_script(inputs: list, options: EngineOptions, onnx_file: str = "vision.onnx") -> str:
    """``build_engine.sh``: run on the target device (engines are tied to one GPU and TensorRT version)."""
    command = " ".join(shlex.quote(c) for c in trtexec_command(onnx_file, ENGINE_FILE, inputs, options))
    batch = f"--min-batch {options.min_batch} --opt-batch {options.opt_batch} --max-batch {options.max_batch}"
    return f"""#!/usr/bin/env bash
# Build the TensorRT engine for this artifact ON THE DEVICE THAT WILL RUN IT ({options.target}).
# An engine is tied to one GPU model and one TensorRT version; building elsewhere gives an engine the runtime refuses.
# Either line works; the second also records the engine (TensorRT version, GPU, flags, sha256) in manifest.json,
# which the prumerge runtime needs to load it. Layers of the reducer stay FP32 under FP16 only with the second.
set -euo pipefail
cd "$(dirname "$0")"

# 1. trtexec (JetPack: /usr/src/tensorrt/bin/trtexec)
# {command}

# 2. prumerge (pip install prumerge on the device; recommended)
prumerge-export engine . --target {options.target} --precision {options.precision} --workspace {options.workspace_mib} {batch}
"""


# ---------------------------------------------------------------------------------------------- device facts
def build_engine(onnx_path: Path, engine_path: Path, inputs: list, options: EngineOptions) -> dict:
    """Parse and build with the TensorRT Python API; write the engine; return the facts for the manifest."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError("TensorRT is not installed here (pip install tensorrt, or JetPack's python3-libnvinfer); "
                                      "build_engine.sh in the artifact runs the same build on the device") from exc
    import onnx

    from ..artifact.nodes import classify_nodes

    graph = onnx.load(str(onnx_path), load_external_data=False)
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.graph.node)
    flags = builder_flags(options, has_qdq)
    profile_shapes = optimization_profile(inputs, options)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 0
    for name in flags["network"]:
        network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    for name in flags["builder"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    pinned = []
    if options.precision == "fp16":
        stages = classify_nodes(onnx_path)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if keep_fp32(layer.name, stages):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    if layer.get_output(j).dtype in (trt.float32, trt.float16):
                        layer.set_output_type(j, trt.float32)
                pinned.append(layer.name)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build {onnx_path.name} (see the log above)")
    engine_path.write_bytes(memoryview(serialized))
    if cache_path is not None:
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return {**device_facts(), "file": engine_path.name, "options": options.to_dict(), "flags": flags,
            "fp32_layers": len(pinned), "profile": {k: [list(s) for s in v] for k, v in profile_shapes.items()}}


def add_engine_to_artifact(directory: str | Path, options: EngineOptions) -> dict:
    """Build ``vision.engine`` for an existing artifact on this machine and record it in the manifest."""
    from ..artifact.manifest import Manifest, describe_files

    directory = Path(directory)
    manifest = Manifest.read(directory)
    manifest.verify_files(directory)
    contract = required_contract(options.target)
    if contract and manifest.vision["contract"] != contract:
        raise ConfigError(f"target {options.target} needs the {contract} contract; this artifact has {manifest.vision['contract']}")
    check_batch(options, int(manifest.vision["batch_max"]))
    partial = directory / f".{ENGINE_FILE}.partial"
    try:
        facts = build_engine(directory / manifest.vision["file"], partial, manifest.vision["inputs"], options)
        partial.replace(directory / ENGINE_FILE)
    finally:
        partial.unlink(missing_ok=True)
    facts["file"] = ENGINE_FILE
    manifest.vision["engine"] = facts
    manifest.files = describe_files(directory)
    manifest.write(directory)
    return facts
