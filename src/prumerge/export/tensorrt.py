"""TensorRT engines from an artifact's vision graph, built with polygraphy: targets, precision plan, trtexec script.

Engines are specific to one GPU and one TensorRT version, so on Jetson they are built on the device itself: every
artifact built with ``--target`` carries ``build_engine.sh``, which runs ``prumerge-export engine`` (records the
engine in the manifest) or, with ``--trtexec``, the equivalent ``trtexec`` line.

Precision plan (``precision_plan``):

* ``strongly typed`` (the default path, and the only one in TensorRT 11): the precisions are those of the graph.
  An ``--fp16`` artifact already computes the reducer in FP32 with explicit casts, so its FP16 engine keeps
  selection in FP32 with no per-layer flags; INT8 engines come from the Q/DQ graph; FP32 engines from FP32 graphs.
* ``weakly typed`` FP16 from an FP32 graph, only on TensorRT 10.x (``BuilderFlag.FP16`` is deprecated since 10.12
  and gone in 11): FP16 allowed, precision constraints obeyed, and only float compute layers of the reducer,
  Softmax and normalisation pinned to FP32 (never constants, shapes, or int/bool layers, which trtexec and
  polygraphy skip as well).

polygraphy (NVIDIA's own) carries network loading, config, build, timing cache and saving; what is prumerge's is
the target defaults, the plan, the manifest facts and the mismatch refusal. Everything that needs no TensorRT is
plain Python and tested here; TensorRT itself is imported only when an engine is built.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from pathlib import Path

from ..artifact.contract import QUESTION_ROWS_AXIS
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
    # a question-reading graph (cdpruner): the profile of its question_rows axis (the question's tokens); a longer
    # question is refused by the runtime in one line
    opt_question_rows: int = 32
    max_question_rows: int = 256
    build_here: bool = False  # build: also build vision.engine now (needs TensorRT and the target GPU), not a fact

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; choose one of: {', '.join(TARGETS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown engine precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.workspace_mib < 16:
            raise ConfigError(f"workspace must be at least 16 MiB, got {self.workspace_mib}")
        from .graph import MAX_QUESTION_ROWS

        if not 1 <= self.opt_question_rows <= self.max_question_rows <= MAX_QUESTION_ROWS:
            raise ConfigError("question rows profile must satisfy 1 <= opt <= max <= "
                              f"{MAX_QUESTION_ROWS}, got {self.opt_question_rows}/{self.max_question_rows}")

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
        """What the manifest records: the engine's settings (not whether this build made it)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "build_here"}




def optimization_profile(inputs: list, options: EngineOptions) -> dict:
    """``{input name: (min, opt, max) shapes}``: the leading ``batch`` axis from the batch profile, a question's
    ``question_rows`` axis from 1 / ``opt_question_rows`` / ``max_question_rows``; refuses any other dynamic axis."""
    ranges = {"batch": (options.min_batch, options.opt_batch, options.max_batch),
              QUESTION_ROWS_AXIS: (1, options.opt_question_rows, options.max_question_rows)}
    profile = {}
    for spec in inputs:
        shape = spec.shape
        dynamic = [i for i, d in enumerate(shape) if isinstance(d, str)]
        if not dynamic or dynamic[0] != 0 or shape[0] != "batch" or any(shape[i] not in ranges for i in dynamic[1:]):
            raise ConfigError(f"input {spec.name} has dynamic axes {dynamic}; only a leading 'batch' axis (and a "
                              f"question's '{QUESTION_ROWS_AXIS}') is supported")
        profile[spec.name] = tuple(tuple(ranges[d][k] if isinstance(d, str) else int(d) for d in shape)
                                   for k in range(3))
    return profile


def check_batch(options: EngineOptions, batch_max: int) -> None:
    if options.max_batch > batch_max:
        raise ConfigError(f"engine max batch {options.max_batch} exceeds the graph's exported limit {batch_max}")


def precision_plan(options: EngineOptions, graph_precision: str, has_qdq: bool, tensorrt_version: str | None = None) -> dict:
    """How an engine of ``options.precision`` is built from a graph of ``graph_precision`` (fp32 | fp16 | int8).

    ``{"strongly_typed": bool, "fp16": bool, "pin_fp32": bool}``; a combination that cannot be built faithfully
    is refused with the way to get it.
    """
    engine = options.precision
    if engine == "int8":
        if not has_qdq:
            raise ConfigError("INT8 engines are built from an explicit Q/DQ graph (prumerge-export calibrate + build "
                              "--precision int8); TensorRT's implicit INT8 calibration is deprecated")
        return {"strongly_typed": True, "fp16": False, "pin_fp32": False}
    if engine == graph_precision or (engine == "fp32" and graph_precision == "fp32"):
        return {"strongly_typed": True, "fp16": False, "pin_fp32": False}
    if engine == "fp16" and graph_precision == "fp32":
        major = _major(tensorrt_version)
        if major is not None and major >= 11:
            raise ConfigError("TensorRT 11 builds strongly typed networks only: export the graph with --fp16 for an "
                              "FP16 engine (its reducer computes in FP32 with explicit casts)")
        return {"strongly_typed": False, "fp16": True, "pin_fp32": True}
    raise ConfigError(f"a {engine} engine cannot be built from this {graph_precision} graph; rebuild the artifact "
                      f"{'with --fp16' if engine == 'fp16' else 'without --fp16'}")


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except (TypeError, ValueError):
        return None


FP32_WORDS = ("softmax", "layernorm", "layer_norm", "layernormalization", "reducel2")


def keep_fp32(layer_name: str, op_stage: dict) -> bool:
    """Layers that stay FP32 under weakly typed FP16: everything traced from the reducer, softmax, normalisation.
    (Which of those layers *can* carry a precision is decided in :func:`pinnable`.)"""
    lowered = layer_name.lower()
    if any(word in lowered for word in FP32_WORDS):
        return True
    name = layer_name.split(" ")[0]
    for node, stage in op_stage.items():
        if stage == "reducer" and (name == node or name.startswith(node + "_") or name.startswith(node + ".")):
            return True
    return False


# layer types that carry no float arithmetic: pinning their precision breaks builds under OBEY (trtexec and
# polygraphy skip them too)
NON_COMPUTE_LAYERS = ("CONSTANT", "SHAPE", "IDENTITY", "SHUFFLE", "SLICE", "CONCATENATION", "GATHER", "SCATTER",
                      "CONDITION", "ASSERTION", "FILL", "NON_ZERO", "CAST")


def pinnable(layer_type: str, output_dtypes: list) -> bool:
    """A layer whose precision may be set: float compute (not a constant/shape/data-movement layer) with float outputs."""
    return layer_type not in NON_COMPUTE_LAYERS and bool(output_dtypes) and all(d in ("FLOAT", "HALF") for d in output_dtypes)


def fp32_layer_patterns(op_stage: dict) -> list:
    """trtexec ``--layerPrecisions`` names for the reducer's nodes: one ``*`` each (all trtexec accepts), a
    prefix match so that layers TensorRT expands a node into are covered."""
    return sorted(f"{node}*" for node, stage in op_stage.items() if stage == "reducer")


def _shape_arg(profile: dict, index: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[index]))}" for name, shapes in profile.items())


def trtexec_command(onnx_file: str, engine_file: str, inputs: list, options: EngineOptions, plan: dict | None = None,
                    op_stage: dict | None = None, trtexec: str = "trtexec") -> list:
    """The ``trtexec`` argument list equivalent to :func:`build_engine` for ``plan`` (what ``build_engine.sh
    --trtexec`` runs)."""
    profile = optimization_profile(inputs, options)
    plan = plan or {"strongly_typed": True, "fp16": False, "pin_fp32": False}
    cmd = [trtexec, f"--onnx={onnx_file}", f"--saveEngine={engine_file}", f"--minShapes={_shape_arg(profile, 0)}",
           f"--optShapes={_shape_arg(profile, 1)}", f"--maxShapes={_shape_arg(profile, 2)}",
           f"--memPoolSize=workspace:{options.workspace_mib}M",
           # trtexec allows TF32 unless told not to; polygraphy's CreateConfig clears it (the build above). TF32
           # moved token counts on real weights (H200, bench_gpu.py), so the two builds must agree: fp32 is fp32.
           "--noTF32"]
    if plan["strongly_typed"]:
        cmd += ["--stronglyTyped"]
    if plan["fp16"]:
        cmd += ["--fp16"]
    if plan["pin_fp32"]:
        patterns = fp32_layer_patterns(op_stage or {})
        cmd += ["--precisionConstraints=obey"]
        if patterns:
            cmd += ["--layerPrecisions=" + ",".join(f"{p}:fp32" for p in patterns)]
    if options.timing_cache:
        cmd += [f"--timingCacheFile={options.timing_cache}"]
    return cmd


def build_script(inputs: list, options: EngineOptions, onnx_file: str = "vision.onnx", plan: dict | None = None,
                 op_stage: dict | None = None) -> str:
    """``build_engine.sh``: run on the target device (engines are tied to one GPU and TensorRT version)."""
    command = " ".join(shlex.quote(c) for c in trtexec_command(onnx_file, ENGINE_FILE, inputs, options, plan, op_stage))
    batch = f"--min-batch {options.min_batch} --opt-batch {options.opt_batch} --max-batch {options.max_batch}"
    if any(QUESTION_ROWS_AXIS in spec.shape for spec in inputs):
        batch += f" --opt-question-rows {options.opt_question_rows} --max-question-rows {options.max_question_rows}"
    return f"""#!/usr/bin/env bash
# Build the TensorRT engine for this artifact ON THE DEVICE THAT WILL RUN IT ({options.target}).
# An engine is tied to one GPU model and one TensorRT version; building elsewhere gives an engine the runtime refuses.
#   bash build_engine.sh            prumerge-export engine: builds with polygraphy and records the engine
#                                   (TensorRT version, GPU, plan, sha256) in manifest.json, which the runtime needs
#   bash build_engine.sh --trtexec  the equivalent trtexec build (JetPack: /usr/src/tensorrt/bin/trtexec); the
#                                   engine is not recorded, so prumerge's runtime will not load it (Triton will)
set -euo pipefail
cd "$(dirname "$0")"
if [ "${{1:-}}" = "--trtexec" ]; then
  TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
  exec "$TRTEXEC" {command.split(" ", 1)[1]}
fi
exec prumerge-export engine . --target {options.target} --precision {options.precision} --workspace {options.workspace_mib} {batch}
"""


# ---------------------------------------------------------------------------------------------- device facts
def graph_facts(onnx_path: Path) -> dict:
    """What the plan depends on: the graph's float precision and whether it carries Q/DQ nodes."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    input_type = graph.input[0].type.tensor_type.elem_type
    return {"has_qdq": has_qdq, "precision": "int8" if has_qdq else ("fp16" if input_type == onnx.TensorProto.FLOAT16 else "fp32")}


def polygraphy_build(onnx_path: Path, inputs: list, options: EngineOptions, plan: dict, op_stage: dict | None = None):
    """The polygraphy loader chain for ``plan`` (lazy: nothing runs until it is called)."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, (low, opt, high) in optimization_profile(inputs, options).items():
        profile.add(name, min=low, opt=opt, max=high)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=plan["strongly_typed"])
    if plan["pin_fp32"]:
        network = _PinFp32(network, op_stage or {})
    cache = options.timing_cache
    # tf32=False: CreateConfig then clears TensorRT's default-on TF32 flag (fp32 layers stay fp32; TF32 changed token
    # counts on real weights on an H200, bench_gpu.py); said here so a polygraphy default cannot change it
    config = CreateConfig(fp16=plan["fp16"] or None, tf32=False,
                          precision_constraints="obey" if plan["pin_fp32"] else None,
                          profiles=[profile], memory_pool_limits=_workspace(options),
                          load_timing_cache=cache if cache and Path(cache).is_file() else None)
    return EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)


def _workspace(options: EngineOptions):
    import tensorrt as trt

    return {trt.MemoryPoolType.WORKSPACE: options.workspace_mib << 20}


class _PinFp32:
    """Network loader wrapper (weakly typed FP16 only): the reducer's float compute layers, softmax and
    normalisation run in FP32; constants, shapes, data movement and int/bool layers are left alone."""

    def __init__(self, network, op_stage: dict) -> None:
        self.network, self.op_stage, self.pinned = network, op_stage, []

    def __call__(self):
        import tensorrt as trt

        built = self.network()
        net = built[1]
        for i in range(net.num_layers):
            layer = net.get_layer(i)
            dtypes = [layer.get_output(j).dtype.name for j in range(layer.num_outputs)]
            if keep_fp32(layer.name, self.op_stage) and pinnable(layer.type.name, dtypes):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                self.pinned.append(layer.name)
        return built


def build_engine(onnx_path: Path, engine_path: Path, inputs: list, options: EngineOptions, op_stage: dict | None = None) -> dict:
    """Build with polygraphy (parse, config, build, timing cache), write the engine; return the manifest facts."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError("TensorRT is not installed here (pip install tensorrt, or JetPack's python3-libnvinfer); "
                                      "build_engine.sh in the artifact runs the same build on the device") from exc
    try:
        import polygraphy  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError("engine builds use polygraphy: pip install 'prumerge[trt]'") from exc
    from ..artifact.node_stages import classify_nodes

    facts = graph_facts(onnx_path)
    plan = precision_plan(options, facts["precision"], facts["has_qdq"], trt.__version__)
    if plan["pin_fp32"] and op_stage is None:
        op_stage = classify_nodes(onnx_path)
    loader = polygraphy_build(onnx_path, inputs, options, plan, op_stage)
    try:
        serialized = loader()
    except Exception as exc:  # polygraphy raises PolygraphyException with TensorRT's parser/builder messages
        raise EngineBuildError(f"TensorRT {trt.__version__} could not build {onnx_path.name}: {exc}") from exc
    engine_path.write_bytes(memoryview(serialized))
    pinned = getattr(loader._network, "pinned", [])  # the _PinFp32 wrapper, when the plan pins layers
    return {**device_facts(), "file": engine_path.name, "options": options.to_dict(), "plan": plan,
            "graph_precision": facts["precision"], "fp32_layers": len(pinned),
            "profile": {k: [list(s) for s in v] for k, v in optimization_profile(inputs, options).items()}}


def add_engine_to_artifact(directory: str | Path, options: EngineOptions) -> dict:
    """Build ``vision.engine`` for an existing artifact on this machine and record it in the manifest."""
    from ..artifact.manifest import EngineFacts, Manifest, describe_files, inside

    directory = Path(directory)
    manifest = Manifest.read(directory)
    manifest.verify_files(directory)
    check_batch(options, manifest.vision.batch_max)
    if manifest.vision.attention == "fused":
        raise ConfigError(f"{directory}'s vision graph computes attention with ONNX's fused Attention op (opset "
                          f"{manifest.vision.opset}, built for onnxruntime), which TensorRT 10.3's ONNX parser does not "
                          "take: rebuild it for TensorRT with --target (or --opset 18), then build the engine")
    partial = directory / f".{ENGINE_FILE}.partial"
    try:
        from ..artifact.node_stages import expand

        stages = expand(manifest.vision.node_stages) if manifest.vision.node_stages else None
        facts = build_engine(inside(directory, manifest.vision.file), partial, manifest.vision.inputs, options, stages)
        partial.replace(directory / ENGINE_FILE)
    finally:
        partial.unlink(missing_ok=True)
    facts["file"] = ENGINE_FILE
    manifest.vision.engine = EngineFacts.parse(facts, "vision.engine")
    manifest.files = describe_files(directory)
    manifest.write(directory)
    return facts


def engine_overrides(flags: dict) -> dict:
    """The engine tuning flags (``build`` and ``engine`` share them; popped from ``flags``, click's parameter names)
    as :class:`EngineOptions` fields; unset ones (None) take the target's defaults."""
    timing_cache = flags.pop("timing_cache")
    return {"precision": flags.pop("precision"), "workspace_mib": flags.pop("workspace"),
            "min_batch": flags.pop("min_batch"), "opt_batch": flags.pop("opt_batch"), "max_batch": flags.pop("max_batch"),
            "opt_question_rows": flags.pop("opt_question_rows"), "max_question_rows": flags.pop("max_question_rows"),
            "timing_cache": str(timing_cache) if timing_cache else None}
