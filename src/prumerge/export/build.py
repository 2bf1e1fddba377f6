"""``build``: checkpoint -> artifact directory (vision graph(s), LLM, manifest.json), staged and renamed at the end.

Stages: load the vision side, export, check the graph, validate onnxruntime against PyTorch, optionally export the
unreduced baseline graph and the quantised LLM, describe, hash. Any failure removes the staging directory, so
nothing that looks like an artifact is left behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..artifact.manifest import Manifest, describe_files
from .staging import staged_directory
from ..artifact.contract import EXTRA_TOKEN_INDEX, PADDING_INDEX
from ..reduce.config import Method

VISION_FILE = "vision.onnx"
BASELINE_FILE = "vision_none.onnx"
PACKAGES = ("prumerge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-genai", "numpy")


@dataclasses.dataclass
class BuildOptions:
    """Everything ``prumerge-export build`` takes, with the CLI's defaults."""

    method: str = "prumerge"
    output: str = "padded"
    max_tokens: int | None = None
    opset: int = 18
    fp16: bool = False
    batch_max: int = 16
    validate_images: int = 4
    project: bool = True
    revision: str | None = None
    reducer_options: dict = dataclasses.field(default_factory=dict)
    llm_precision: str | None = "auto"  # int4 | int8 | fp16 | fp32 | None (no LLM); auto: int4 for LLaVA checkpoints
    llm_provider: str = "cpu"
    baseline: bool = False  # also export the unreduced (method none) graph, for comparisons and profiling
    target: str | None = None  # server | jetson-orin | jetson-orin-nano: writes build_engine.sh with its defaults
    engine: bool = False  # build vision.engine here (needs TensorRT and the target GPU)
    engine_options: dict = dataclasses.field(default_factory=dict)  # precision, workspace_mib, *_batch, timing_cache
    calibration: str | None = None  # calibration file from `calibrate`: capacity (and the INT8 image set)
    int8: bool = False  # quantise the vision graph (needs calibration)
    calibration_method: str = "minmax"
    slim: bool = True  # onnxslim constant folding / simplification (validated like any graph)
    image_size: int | None = None  # square input side; None: the checkpoint's processor crop, else its config
    int8_float_layers: int = 0  # INT8: also keep the tower's last K encoder layers float (selection stays closer)
    base: str | None = None  # original-layout LoRA checkpoints: the base LLM (local dir or hub id)
    vision_tower: str | None = None  # original-layout checkpoints: the CLIP tower, instead of config's mm_vision_tower


Progress = Callable[[str], None]


def build_artifact(model: str, out: str | Path, options: BuildOptions = BuildOptions(), force: bool = False,
                   progress: Progress | None = None) -> Manifest:
    """Build the artifact for ``model`` (local checkpoint dir or hub id) into ``out``; return its manifest."""
    from ..model.checkpoint import Checkpoint
    from ..model.encoder import PruMergeEncoder
    from .convert import as_llava_hf

    from .graph import check_opset

    step = progress or (lambda message: None)
    method = Method.parse(options.method)
    check_opset(options.opset)
    if options.max_tokens is not None and method is Method.NONE:
        raise ConfigError("--max-tokens applies to prumerge / prumerge+, not to method none")
    calibration = None
    if options.calibration:
        from ..calib.budget import BudgetReport

        calibration = BudgetReport.read(options.calibration)
        if options.max_tokens is None and method is not Method.NONE:
            options = dataclasses.replace(options, max_tokens=calibration.capacity(method.value))
    if options.int8 and calibration is None:
        raise ConfigError("an INT8 vision graph needs --calibration FILE (from prumerge-export calibrate)")
    engine_options = None
    if options.target or options.engine:
        from .tensorrt import EngineOptions, check_batch

        engine_options = EngineOptions.for_target(options.target or "server", **options.engine_options)
        check_batch(engine_options, options.batch_max)
    with staged_directory(out, force=force, inputs=(model, options.base, options.vision_tower, options.calibration)) as stage, \
            as_llava_hf(model, options.base, options.vision_tower, target=Path(out).resolve(), progress=step) as (checkpoint, converted):
        step(f"loading the vision side of {model}")
        encoder = PruMergeEncoder.from_pretrained(
            checkpoint, method=method, project=options.project, revision=options.revision,
            capacity=options.max_tokens, image_size=options.image_size, **options.reducer_options,
        )
        config = encoder.checkpoint_config
        if converted:  # the manifest names what the user gave, not the temporary conversion
            encoder.source.update(converted, model=model, fingerprint=Checkpoint.open(model).fingerprint())
        if calibration is not None:
            calibration.check_model(encoder)
        is_llava = getattr(config, "model_type", None) == "llava"
        llm_precision = options.llm_precision
        if llm_precision == "auto":
            llm_precision = "int4" if is_llava and options.project else None
        if llm_precision and not (is_llava and options.project):
            raise ConfigError("--llm-precision needs a LLaVA checkpoint with its projector; use --no-llm for vision-only builds")
        if llm_precision:
            from .llm import require_safetensors

            require_safetensors(Checkpoint.open(checkpoint, revision=options.revision))
        _copy_processor_config(encoder.processor, stage)
        vision = _vision_graph(encoder, stage / VISION_FILE, options, step)
        if options.int8:
            int8_target = "tensorrt" if engine_options is not None else "cpu"
            vision.update(_quantize(encoder, stage, calibration, options.calibration_method, int8_target, step,
                                    options.int8_float_layers))
            vision["node_stages"] = _node_stages(stage / VISION_FILE)
        baseline = None
        if options.baseline and method is not Method.NONE:
            plain = PruMergeEncoder.from_pretrained(checkpoint, method="none", project=options.project, revision=options.revision,
                                                    image_size=encoder.image_size)
            baseline = _vision_graph(plain, stage / BASELINE_FILE, options, step)

        llm = _llm_facts(config) if is_llava and options.project else None
        if llm_precision:
            from .llm import build_llm

            step(f"converting the language model to an {llm_precision} ONNX decoder (onnxruntime-genai builder)")
            llm = build_llm(checkpoint, options.revision, config, stage, llm_precision, options.llm_provider)
        if llm is not None and llm["hidden_size"] != encoder.output_width:
            raise ConfigError(f"the LLM's hidden size is {llm['hidden_size']} but the vision graph gives {encoder.output_width}-wide tokens")

        if engine_options is not None:
            from ..artifact.node_stages import expand
            from .tensorrt import ENGINE_FILE, SCRIPT_FILE, build_engine, build_script, precision_plan

            stages = expand(vision["node_stages"])
            plan = precision_plan(engine_options, vision["precision"], vision["precision"] == "int8")
            script = stage / SCRIPT_FILE
            script.write_text(build_script(vision["inputs"], engine_options, VISION_FILE, plan, stages))
            script.chmod(0o755)
            vision["tensorrt_target"] = engine_options.to_dict() | {"plan": plan}
            if options.engine:
                step(f"building the TensorRT engine ({engine_options.precision}, {engine_options.target})")
                vision["engine"] = build_engine(stage / VISION_FILE, stage / ENGINE_FILE, vision["inputs"], engine_options, stages)

        step("writing manifest")
        manifest = Manifest(
            source=encoder.source,
            reducer={
                "options": {k: v for k, v in encoder.reducer.to_dict().items() if k not in ("method", "capacity")},
                "num_patches": encoder.num_patches,
                "grid": encoder.grid,
                "image_size": encoder.image_size,
                "patch_size": encoder.patch_size,
                "feature_layer": encoder.feature_index - (encoder.num_layers + 1),
                "extra_token_index": EXTRA_TOKEN_INDEX,
                "padding_index": PADDING_INDEX,
            },
            vision=vision,
            baseline=baseline,
            preprocess=encoder.preprocess_config().to_dict(),
            llm=llm,
            packages=_package_versions() | {"python": platform.python_version()},
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        manifest.files = describe_files(stage)
        manifest.write(stage)
    step(f"artifact ready: {Path(out)}")
    return manifest


def _quantize(encoder, stage: Path, calibration, method: str, target: str, step: Progress, float_layers: int = 0) -> dict:
    """Replace the validated fp32 graph by its INT8 QDQ version; record how it agrees with fp32 on the set."""
    import onnx

    from ..calib.images import CalibrationSet
    from ..calib.int8 import agreement, quantize_vision, session_outputs
    from .checks import check_onnx, op_support_all

    images = CalibrationSet.from_source(calibration.source)
    pixels = images.pixels(encoder.preprocess_config())
    fp32_dir = stage / ".fp32"
    fp32_dir.mkdir()
    for part in stage.glob(VISION_FILE + "*"):
        part.replace(fp32_dir / part.name)
    step(f"quantising {VISION_FILE} to INT8 ({method} calibration on {len(pixels)} images, {target} Q/DQ)")
    info = quantize_vision(fp32_dir / VISION_FILE, stage / VISION_FILE, pixels, method, target=target,
                           float_layers=float_layers)
    check_onnx(stage / VISION_FILE)
    step("comparing INT8 with fp32 on the calibration set")
    info["agreement"] = agreement(session_outputs(fp32_dir / VISION_FILE, pixels), session_outputs(stage / VISION_FILE, pixels)).to_dict()
    shutil.rmtree(fp32_dir)
    graph = onnx.load(str(stage / VISION_FILE), load_external_data=False)
    return {"precision": "int8", "int8": info, "tensorrt": op_support_all(graph)}


def _vision_graph(encoder, path: Path, options: BuildOptions, step: Progress) -> dict:
    """Export, check and validate one vision graph; return its manifest entry (with its validation)."""
    import onnx

    from .checks import check_onnx, op_support_all
    from .graph import INPUT_NAME, Contract, export_onnx, output_shapes, simplify
    from .validate import require, synthetic_pixels

    contract = Contract.parse(options.output)
    precision = "fp16" if options.fp16 else "fp32"
    if options.fp16:
        encoder = encoder.half()
    method = encoder.reducer.method.value
    step(f"exporting {path.name}: {method}, {contract.value} contract, opset {options.opset}, {precision}")
    export_onnx(encoder, path, contract, options.opset, options.batch_max)
    simplified = {"tool": None, "reason": "--no-slim"}
    if options.slim:
        step(f"simplifying {path.name} (onnxslim)")
        simplified = simplify(path)
    step(f"checking {path.name} (onnx.checker, TensorRT op support)")
    check_onnx(path)
    graph = onnx.load(str(path), load_external_data=False)
    support = op_support_all(graph)
    step(f"validating {path.name} on onnxruntime against PyTorch ({options.validate_images} images)")
    pixels = synthetic_pixels(options.validate_images, encoder.image_size)
    validation = require(_validate(encoder, path, pixels, precision), f"validation of {path.name}")
    return {
        "file": path.name,
        "format": "onnx",
        "method": method,
        "opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        "precision": precision,
        "contract": contract.value,
        "batch_max": options.batch_max,
        "capacity": encoder.capacity,
        "projected": encoder.projector is not None,
        "output_width": encoder.output_width,
        "inputs": [{"name": INPUT_NAME, "dtype": "float32" if precision == "fp32" else "float16",
                    "shape": ["batch", 3, encoder.image_size, encoder.image_size]}],
        "outputs": _measured_outputs(graph, output_shapes(encoder, contract)),
        "tensorrt": support,  # {TensorRT version: op-support report}
        "node_stages": _node_stages(path),
        "simplified": simplified,
        "validation": validation.to_dict(),
    }


def _validate(encoder, path, pixels, precision):
    from ..runtime.vision import VisionSession
    from .validate import validate_against

    session = VisionSession.from_graph(path, batch_max=len(pixels))  # the runtime's own binding and checks
    feed = pixels.astype("float16") if precision == "fp16" else pixels
    got = session.run_pixels(feed).arrays()
    return validate_against(encoder, got, feed, precision, session.provider)


def _node_stages(path: Path) -> dict:
    """``{stage: [node names]}``: recorded so that profiling needs no onnx on the device."""
    from ..artifact.node_stages import classify_nodes, compress

    return compress(classify_nodes(path))


def _measured_outputs(graph, declared: dict) -> list:
    """Output specs read back from the saved graph (what was built, not what was asked), named axes kept."""
    import numpy as np
    import onnx

    specs = []
    for out in graph.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else declared[out.name][i] for i, d in enumerate(out.type.tensor_type.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type)
        specs.append({"name": out.name, "dtype": np.dtype(dtype).name, "shape": dims})
    return specs


def _copy_processor_config(processor: dict | None, stage: Path) -> None:
    """Keep the checkpoint's processor config in the artifact, as found."""
    if processor is not None:
        (stage / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _llm_facts(config) -> dict:
    """What is known of the language model without converting it (``--no-llm`` builds)."""
    text = config.text_config
    return {
        "decoder": None,
        "model_type": text.model_type,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "image_token_id": getattr(config, "image_token_id", getattr(config, "image_token_index", None)),
    }


def _package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
