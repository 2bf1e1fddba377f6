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

from ..errors import ConfigError, ExportError
from ..artifact.manifest import (EngineFacts, EngineTarget, GraphSection, Manifest, TensorSpec, TextSection,
                                 describe_files)
from .staging import staged_directory
from ..reduce.config import Method
from .options import BuildOptions, GraphOptions, Int8Options

VISION_FILE = "vision.onnx"
BASELINE_FILE = "vision_none.onnx"
PACKAGES = ("prumerge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-genai", "numpy")


Progress = Callable[[str], None]


def build_artifact(model: str, out: str | Path, options: BuildOptions = BuildOptions(), force: bool = False,
                   progress: Progress | None = None) -> Manifest:
    """Build the artifact for ``model`` (local checkpoint dir or hub id) into ``out``; return its manifest.

    The stages, in order, each given only its own options: the calibration file (capacity), the vision side, the
    language model's precision, the vision graph (export, check, validate), INT8, the unreduced baseline graph, the
    language model, the TensorRT script / engine, the manifest."""
    from .convert import as_llava_hf

    step = progress or (lambda message: None)
    calibration, options = _calibration(options)
    source = options.source
    with staged_directory(out, force=force, inputs=(model, source.base, source.vision_tower, source.text_encoder,
                                                    options.calibration)) as stage, \
            as_llava_hf(model, source.base, source.vision_tower, target=Path(out).resolve(), progress=step) as (checkpoint, converted):
        encoder = _vision_side(model, checkpoint, converted, options, calibration, step)
        text_tower = _text_side(encoder, options, step)
        llm_precision = _llm_precision(encoder, checkpoint, options)
        _copy_processor_config(encoder.processor, stage)
        vision = _vision_graph(encoder, stage / VISION_FILE, options.graph, step)
        if options.int8 is not None:
            vision = _quantize(vision, encoder, stage, calibration, options.int8, options.engine is not None, step)
        if encoder.patch_output_names():
            vision = _reducer_graph(encoder, stage, vision, options.graph, step)
        baseline = _baseline_graph(checkpoint, encoder, stage, options, step)
        llm = _language_model(checkpoint, encoder, stage, options, llm_precision, calibration, step)
        if options.engine is not None:
            vision = _tensorrt(stage, vision, options.engine, step)
        text = None
        if text_tower is not None:
            from .text import export_text_side

            step(f"exporting the text graph (CLIP's text model from {source.text_encoder})")
            text = export_text_side(*text_tower, stage, options.graph.opset, source.text_encoder)
        step("writing manifest")
        manifest = _manifest(encoder, vision, baseline, llm)
        manifest.text = TextSection.from_dict(text, "text")
        manifest.files = describe_files(stage)
        manifest.write(stage)
    step(f"artifact ready: {Path(out)}")
    return manifest


def _text_side(encoder, options: BuildOptions, step: Progress):
    """With ``--text-encoder``: CLIP's image head goes into the encoder (the vision graph computes the patches'
    image embeddings); returns (the text tower, its tokenizer file) for the text graph. None otherwise."""
    if options.source.text_encoder is None:
        return None
    from ..model.text_relevance import load_text_side

    step(f"loading CLIP's text side from {options.source.text_encoder}")
    encoder.image_head, tower, tokenizer = load_text_side(options.source.text_encoder, encoder.tower)
    return tower, tokenizer


def _calibration(options: BuildOptions):
    """The calibration file's report (None without one), and the options with its capacity where none was given."""
    if not options.calibration:
        return None, options
    from ..calib.budget import BudgetReport

    calibration = BudgetReport.read(options.calibration)
    if options.reducer.capacity is None and options.method.adaptive:
        options = options.with_capacity(calibration.capacity(options.method.value))
    return calibration, options


def _vision_side(model: str, checkpoint, converted, options: BuildOptions, calibration, step: Progress):
    from ..model.checkpoint import Checkpoint
    from ..model.encoder import PruMergeEncoder

    step(f"loading the vision side of {model}")
    encoder = PruMergeEncoder.from_pretrained(checkpoint, project=options.graph.project, revision=options.source.revision,
                                              image_size=options.graph.image_size, **options.reducer.to_dict())
    if converted:  # the manifest names what the user gave, not the temporary conversion
        encoder.source.update(converted, model=model, fingerprint=Checkpoint.open(model).fingerprint())
    if calibration is not None:
        calibration.check_model(encoder)
    return encoder


def _has_llm(encoder, options: BuildOptions) -> bool:
    return getattr(encoder.checkpoint_config, "model_type", None) == "llava" and options.graph.project


def _llm_precision(encoder, checkpoint, options: BuildOptions) -> str | None:
    """The decoder precision to build (``auto``: int4 where the checkpoint has a language model), checked against
    the checkpoint before any graph is exported."""
    precision = options.llm.precision if options.llm is not None else None
    if precision == "auto":
        precision = "int4" if _has_llm(encoder, options) else None
    if precision and not _has_llm(encoder, options):
        raise ConfigError("--llm-precision needs a LLaVA checkpoint with its projector; use --no-llm for vision-only builds")
    if precision:
        from ..model.checkpoint import Checkpoint
        from .llm import require_safetensors

        require_safetensors(Checkpoint.open(checkpoint, revision=options.source.revision))
    return precision


def _baseline_graph(checkpoint, encoder, stage: Path, options: BuildOptions, step: Progress) -> dict | None:
    """The unreduced (method none) graph beside the reduced one, at the same input size."""
    if not options.graph.baseline or options.method is Method.NONE:
        return None
    from ..model.encoder import PruMergeEncoder

    plain = PruMergeEncoder.from_pretrained(checkpoint, method="none", project=options.graph.project,
                                            revision=options.source.revision, image_size=encoder.image_size)
    return _vision_graph(plain, stage / BASELINE_FILE, options.graph, step)


def _language_model(checkpoint, encoder, stage: Path, options: BuildOptions, precision: str | None, calibration,
                    step: Progress) -> dict | None:
    """The decoder (when a precision is asked for), else what is known of the LLM without converting it."""
    if not _has_llm(encoder, options):
        return None
    config = encoder.checkpoint_config
    if precision:
        from .llm import build_llm

        step(f"converting the language model to an {precision} ONNX decoder (onnxruntime-genai builder)")
        visual, images = None, None
        kv_cache = options.llm.kv_cache_for(precision)
        if kv_cache in ("int8", "mixed"):
            visual, images = _kv_calibration_tokens(encoder, stage, calibration)
            step(f"then an int8 KV cache{' (float prefill)' if kv_cache == 'mixed' else ''}, calibrated on "
                 f"{len(visual)} prompts (the vision graphs' tokens for {images['used']} calibration images)")
        llm = build_llm(checkpoint, options.source.revision, config, stage, precision, options.llm.provider,
                        kv_visual=visual, kv_images=images, kv_prefill="float" if kv_cache == "mixed" else "int8")
    else:
        llm = _llm_facts(config)
    if llm["hidden_size"] != encoder.output_width:
        raise ConfigError(f"the LLM's hidden size is {llm['hidden_size']} but the vision graph gives {encoder.output_width}-wide tokens")
    return llm


KV_CALIBRATION_IMAGES = 8


def _kv_calibration_tokens(encoder, stage: Path, calibration) -> tuple[list, dict]:
    """(one image's visual tokens per calibration prompt, their source): the build's calibration images (the
    calibration file's set, else synthetic ones) through the artifact's own vision graph and, when built, its
    unreduced baseline graph, as the runtime will feed them."""
    import dataclasses

    from ..calib.images import CalibrationSet
    from ..runtime.vision import VisionSession

    images = CalibrationSet.from_source(calibration.source) if calibration is not None \
        else CalibrationSet.synthetic(KV_CALIBRATION_IMAGES)
    images = dataclasses.replace(images, images=images.images[:KV_CALIBRATION_IMAGES])
    pixels = images.pixels(encoder.preprocess_config())
    visual = []
    for name in (VISION_FILE, BASELINE_FILE):
        if (stage / name).is_file():
            session = VisionSession.from_graph(stage / name, batch_max=1)
            out = session.run_pixels(pixels, session.probe_question(len(pixels)))
            visual += [out.image(b).astype("float32") for b in range(len(pixels))]
    return visual, dict(images.source, used=len(pixels))


def _tensorrt(stage: Path, vision: GraphSection, engine, step: Progress) -> GraphSection:
    """``build_engine.sh`` for the engine's target (and the engine itself with ``engine.build_here``)."""
    from ..artifact.node_stages import expand
    from .tensorrt import ENGINE_FILE, SCRIPT_FILE, build_engine, build_script, precision_plan

    stages = expand(vision.node_stages)
    plan = precision_plan(engine, vision.precision, vision.precision == "int8")
    script = stage / SCRIPT_FILE
    script.write_text(build_script(vision.inputs, engine, VISION_FILE, plan, stages))
    script.chmod(0o755)
    built = None
    if engine.build_here:
        step(f"building the TensorRT engine ({engine.precision}, {engine.target})")
        facts = build_engine(stage / VISION_FILE, stage / ENGINE_FILE, vision.inputs, engine, stages)
        built = EngineFacts.parse(facts, "vision.engine")
    return dataclasses.replace(vision, tensorrt_target=EngineTarget(**engine.to_dict(), plan=plan), engine=built)


def _manifest(encoder, vision: GraphSection, baseline: GraphSection | None, llm: dict | None) -> Manifest:
    return Manifest(
        source=encoder.source,
        reducer=encoder.reducer_section(),
        vision=vision,
        baseline=baseline,
        preprocess=encoder.preprocess_config().to_dict(),
        llm=llm,
        packages=_package_versions() | {"python": platform.python_version()},
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _reducer_graph(encoder, stage: Path, vision: GraphSection, options: GraphOptions, step: Progress) -> GraphSection:
    """A question-reading graph's reducer alone (``vision_reducer.onnx``), checked on onnxruntime against the main
    graph: on the main graph's patch outputs it gives the main graph's tokens for the same question."""
    import numpy as np

    from ..artifact.contract import OUTPUT_NAMES, REDUCER_GRAPH_FILE
    from ..runtime.vision import VisionSession
    from .graph import Contract, export_reducer_graph
    from .validate import synthetic_pixels

    step(f"exporting {REDUCER_GRAPH_FILE}: the {vision.method} reducer alone (a second question on an image)")
    export_reducer_graph(encoder, stage / REDUCER_GRAPH_FILE, Contract.parse(options.contract), options.opset,
                         options.batch_max)
    session = VisionSession.from_graph(stage / VISION_FILE, batch_max=options.batch_max)
    session.open_reducer(stage / REDUCER_GRAPH_FILE)
    pixels = synthetic_pixels(2, encoder.image_size).astype(session.input_dtype)
    question = session.probe_question(len(pixels))
    whole, patches = session.run_keeping_patches(pixels, question)
    alone = session.reduce_patches(patches, question)
    for name in OUTPUT_NAMES:
        a, b = getattr(whole, name), getattr(alone, name)
        same = np.array_equal(a, b) if name != "tokens" else np.allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(a).max()))
        if not same:
            raise ExportError(f"{REDUCER_GRAPH_FILE} disagrees with {VISION_FILE} on {name} for the same patches "
                              "and question")
    return dataclasses.replace(vision, reducer_graph=REDUCER_GRAPH_FILE)


def _quantize(vision: GraphSection, encoder, stage: Path, calibration, int8: Int8Options, for_tensorrt: bool,
              step: Progress) -> GraphSection:
    """Replace the validated fp32 graph by its INT8 QDQ version; record how it agrees with fp32 on the set
    (TensorRT's Q/DQ form where an engine is asked for, onnxruntime's otherwise)."""
    import onnx

    from ..calib.images import CalibrationSet
    from ..calib.int8 import quantize_and_compare
    from .checks import check_onnx, op_support_all

    images = CalibrationSet.from_source(calibration.source)
    pixels = images.pixels(encoder.preprocess_config())
    fp32_dir = stage / ".fp32"
    fp32_dir.mkdir()
    for part in stage.glob(VISION_FILE + "*"):
        part.replace(fp32_dir / part.name)
    target = "tensorrt" if for_tensorrt else "cpu"
    step(f"quantising {VISION_FILE} to INT8 (" + ("activation scales per token at run time, MatMulInteger"
                                                   if int8.method == "per-token" else
                                                   f"{int8.method} calibration on {len(pixels)} images, {target} Q/DQ") + ")")
    if int8.target_jaccard is not None:  # the choice logs each probe, and says so when every part float misses it
        step(f"choosing the tower parts to keep float for a mean Jaccard of {int8.target_jaccard:g} with fp32")
    info = quantize_and_compare(fp32_dir / VISION_FILE, stage / VISION_FILE, pixels, int8.method, target,
                                int8.float_layers, int8.target_jaccard,
                                log=lambda line: step(line if line.startswith("comparing") else f"  {line}"))
    check_onnx(stage / VISION_FILE)
    shutil.rmtree(fp32_dir)
    graph = onnx.load(str(stage / VISION_FILE), load_external_data=False)
    return dataclasses.replace(vision, precision="int8", int8=info, tensorrt=op_support_all(graph),
                               node_stages=_node_stages(stage / VISION_FILE))


def _vision_graph(encoder, path: Path, options: GraphOptions, step: Progress) -> GraphSection:
    """Export, check and validate one vision graph; return its manifest section (with its validation)."""
    import onnx

    from .checks import check_onnx, op_support_all
    from .graph import Contract, attention_form, export_onnx, input_specs, output_shapes, simplify
    from .validate import require, synthetic_pixels

    contract = Contract.parse(options.contract)
    precision = options.precision
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
    section = GraphSection(
        file=path.name,
        format="onnx",
        method=method,
        opset=next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        attention=attention_form(graph.graph),
        precision=precision,
        contract=contract.value,
        batch_max=options.batch_max,
        capacity=encoder.capacity,
        projected=encoder.projector is not None,
        output_width=encoder.output_width,
        inputs=input_specs(encoder, precision),
        outputs=_measured_outputs(graph, output_shapes(encoder, contract)),
        tensorrt=support,  # {TensorRT version: OpSupport}
        node_stages=_node_stages(path),
        simplified=simplified,
        validation=validation,
    )
    section.check(path.name)  # what a reader will check, checked before it is written
    return section


def _validate(encoder, path, pixels, precision):
    from ..runtime.vision import VisionSession
    from .validate import validate_against

    session = VisionSession.from_graph(path, batch_max=len(pixels))  # the runtime's own binding and checks
    feed = pixels.astype("float16") if precision == "fp16" else pixels
    question = session.probe_question(len(pixels))  # a question-reading graph: the contract's probe question
    got = session.run_pixels(feed, question)
    return validate_against(encoder, got, feed, precision, session.provider, question)



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
        specs.append(TensorSpec(out.name, np.dtype(dtype).name, dims))
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
