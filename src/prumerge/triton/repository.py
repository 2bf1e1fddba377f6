"""``prumerge-export triton``: a Triton model repository generated from an artifact's manifest (nothing typed by
hand).

Layout (``OUT/models`` is what ``tritonserver --model-repository`` takes; ``OUT/artifact`` is the artifact the
Python models read, verified at load)::

    OUT/models/prumerge_vision/config.pbtxt        GPU: tensorrt_plan (artifact engine) or onnxruntime backend
    OUT/models/prumerge_vision/configs/cpu.pbtxt   CPU: Python backend running prumerge's onnxruntime session
    OUT/models/prumerge_vision/1/                  model.plan | model.onnx (+ data) | model.py
    OUT/models/prumerge_llm/...                    Python backend, decoupled: prompt assembly + decoder, streamed
    OUT/models/prumerge/...                        Python backend, decoupled, BLS: image bytes + prompt -> text
    OUT/artifact/                                  the artifact (files of 64 MiB and more hard-linked, others copied)

Select the CPU variant with ``--model-config-name=cpu`` (Triton 24.05+). Every config's inputs and outputs come from
the manifest's graph specs (padded contract: static shapes that batch).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from ..artifact.contract import INPUT_NAME
from ..artifact.manifest import Manifest, inside
from ..errors import ConfigError

VISION_MODEL = "prumerge_vision"
LLM_MODEL = "prumerge_llm"
BLS_MODEL = "prumerge"
MODELS_DIR = "models"
ARTIFACT_DIR = "artifact"
QUESTION_ROWS_MULTIPLE = 16  # the entry model pads a question's rows to this multiple (padding rows are masked)
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}


@dataclasses.dataclass
class TritonOptions:
    instances: int = 1  # vision model instances per device (instance_group count)
    llm_instances: int = 1  # language-model instances: each decodes one request at a time, so N overlap N answers
    max_inflight: int = 16  # requests the entry model works on at once (more wait for a slot)
    max_batch: int | None = None  # the vision model's max_batch_size (default: the artifact's batch limit)
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    preferred_batch: tuple = ()
    ort_tensorrt: bool = False  # onnxruntime backend with the TensorRT execution accelerator (GPU config)


def write_repository(artifact: str | Path, out: str | Path, options: TritonOptions = TritonOptions(), force: bool = False) -> dict:
    """Write the repository for ``artifact`` into ``out``; return what was written."""
    from ..export.staging import staged_directory

    artifact = Path(artifact)
    manifest = Manifest.read(artifact)
    manifest.verify_files(artifact)
    vision = manifest.vision
    if vision.contract != "padded":
        raise ConfigError("Triton batches fixed shapes: build the artifact with --output padded (the default)")
    if not (manifest.llm and manifest.llm.decoder):
        raise ConfigError(f"{artifact} has no LLM (built with --no-llm): the repository serves image + prompt -> text")
    max_batch = int(options.max_batch if options.max_batch is not None else vision.batch_max)  # 0 is not "not given"
    if isinstance(options.max_queue_delay_us, bool) or not isinstance(options.max_queue_delay_us, int) \
            or not 0 <= options.max_queue_delay_us <= 10_000_000:
        raise ConfigError(f"--max-queue-delay-us must be in 0..10000000 (microseconds), got {options.max_queue_delay_us}")
    if not 1 <= max_batch <= int(vision.batch_max):
        raise ConfigError(f"--max-batch must be in 1..{vision.batch_max} (the graph's batch limit), got {max_batch}")
    for name, value, high in (("--instances", options.instances, 64), ("--llm-instances", options.llm_instances, 64),
                              ("--max-inflight", options.max_inflight, 4096)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ConfigError(f"{name} must be in 1..{high}, got {value}")
    preferred = [int(b) for b in options.preferred_batch]
    if any(not 1 <= b <= max_batch for b in preferred):
        raise ConfigError(f"--preferred-batch sizes must be in 1..{max_batch}, got {preferred}")
    with staged_directory(out, force=force, kind="triton", inputs=(artifact,)) as stage:
        _link_tree(artifact, stage / ARTIFACT_DIR, manifest)
        models = stage / MODELS_DIR
        written = {VISION_MODEL: _vision_model(models / VISION_MODEL, artifact, manifest, max_batch, preferred, options),
                   LLM_MODEL: _python_model(models / LLM_MODEL, "llm", llm_config(options)),
                   BLS_MODEL: _python_model(models / BLS_MODEL, "bls", bls_config(options))}
    return {"out": str(out), "model_repository": str(Path(out) / MODELS_DIR), "models": written,
            "vision_backend": written[VISION_MODEL]["gpu"]}


# ------------------------------------------------------------------------------------------------ configs
def _io(name: str, dtype: str, dims: list, reshape: bool = False) -> str:
    shape = ", ".join(str(d) if isinstance(d, int) else "-1" for d in dims)  # a question's rows: any count
    extra = " reshape: { shape: [ ] }" if reshape else ""
    return f'  {{ name: "{name}" data_type: {_TYPES[dtype]} dims: [ {shape} ]{extra} }}'


def vision_io(manifest) -> str:
    """Inputs and outputs of the vision graph without the batch axis (``[B]`` outputs as ``[1]`` reshaped). A graph
    that reads the question takes its rows as ``[-1, width]`` and ``[-1]``: the dynamic batcher joins requests whose
    row counts are equal (the entry model pads questions to a multiple of ``QUESTION_ROWS_MULTIPLE`` rows, masked,
    so that most do)."""
    spec = manifest.vision
    inputs = [_io(i.name, i.dtype, i.shape[1:]) for i in spec.inputs]
    outputs = []
    for o in spec.outputs:
        dims = o.shape[1:]
        if any(not isinstance(d, int) for d in dims):
            raise ConfigError(f"output {o.name} has a data-dependent axis {o.shape}: use the padded contract")
        outputs.append(_io(o.name, o.dtype, dims or [1], reshape=not dims))
    return "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n"


def _batching(max_batch: int, preferred: list, options: TritonOptions) -> str:
    sizes = f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else ""
    return f"dynamic_batching {{\n{sizes}  max_queue_delay_microseconds: {int(options.max_queue_delay_us)}\n}}\n"


def vision_config_gpu(manifest, max_batch: int, preferred: list, options: TritonOptions) -> tuple[str, str]:
    """(config text, kind): the native backend: TensorRT plan when the artifact has an engine, else onnxruntime."""
    engine = manifest.vision.engine
    head = f'name: "{VISION_MODEL}"\n'
    if engine:
        head += 'platform: "tensorrt_plan"\n'
        max_batch = min(max_batch, engine.max_batch)
        kind = "tensorrt_plan"
    else:
        head += 'backend: "onnxruntime"\n'
        kind = "onnxruntime"
    text = head + f"max_batch_size: {max_batch}\n" + vision_io(manifest) + _batching(max_batch, preferred, options)
    text += f"instance_group [ {{ count: {options.instances} kind: KIND_GPU }} ]\n"
    if not engine and options.ort_tensorrt:
        precision = "FP16" if manifest.vision.precision == "fp16" else "FP32"
        text += ("optimization { execution_accelerators { gpu_execution_accelerator: [ { name: \"tensorrt\" "
                 f"parameters {{ key: \"precision_mode\" value: \"{precision}\" }} }} ] }} }}\n")
    return text, kind


def vision_config_cpu(manifest, max_batch: int, preferred: list, options: TritonOptions) -> str:
    return (f'name: "{VISION_MODEL}"\nbackend: "python"\nmax_batch_size: {max_batch}\n' + vision_io(manifest)
            + _batching(max_batch, preferred, options) + f"instance_group [ {{ count: {options.instances} kind: KIND_CPU }} ]\n"
            + _artifact_parameter())


def llm_config(options: TritonOptions, kind: str = "KIND_GPU") -> str:
    return (f'name: "{LLM_MODEL}"\nbackend: "python"\nmax_batch_size: 0\nmodel_transaction_policy {{ decoupled: true }}\n'
            "input [\n"
            '  { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "VISUAL_TOKENS" data_type: TYPE_FP32 dims: [ -1, -1 ] optional: true },\n'
            '  { name: "VISUAL_COUNTS" data_type: TYPE_INT64 dims: [ -1 ] optional: true },\n'
            '  { name: "CANCEL_KEY" data_type: TYPE_STRING dims: [ 1 ] optional: true },\n'
            + _generation_inputs() + "\n]\n"
            "output [\n"
            '  { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "RESULT" data_type: TYPE_STRING dims: [ 1 ] }\n]\n'
            f"instance_group [ {{ count: {options.llm_instances} kind: {kind} }} ]\n" + _artifact_parameter())


def bls_config(options: TritonOptions, kind: str = "KIND_CPU") -> str:
    return (f'name: "{BLS_MODEL}"\nbackend: "python"\nmax_batch_size: 0\nmodel_transaction_policy {{ decoupled: true }}\n'
            "input [\n"
            '  { name: "IMAGE" data_type: TYPE_STRING dims: [ -1 ] },\n'
            '  { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] },\n'
            + _generation_inputs() + "\n]\n"
            "output [\n"
            '  { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "VISUAL_TOKENS" data_type: TYPE_INT64 dims: [ -1 ] },\n'
            '  { name: "RESULT" data_type: TYPE_STRING dims: [ 1 ] }\n]\n'
            f"instance_group [ {{ count: 1 kind: {kind} }} ]\n" + _artifact_parameter()
            + f'parameters {{ key: "max_inflight" value: {{ string_value: "{int(options.max_inflight)}" }} }}\n')


def _generation_inputs() -> str:
    rows = [("MAX_NEW_TOKENS", "TYPE_INT32"), ("TEMPERATURE", "TYPE_FP32"), ("TOP_P", "TYPE_FP32"), ("SEED", "TYPE_INT64")]
    return ",\n".join(f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ] optional: true }}' for name, dtype in rows)


def _artifact_parameter() -> str:
    # relative to the model's directory: OUT/models/NAME -> OUT/artifact
    return f'parameters {{ key: "artifact" value: {{ string_value: "../../{ARTIFACT_DIR}" }} }}\n'


# ------------------------------------------------------------------------------------------------ files
MODEL_SOURCES = {"vision": "vision_model.py", "llm": "llm_model.py", "bls": "bls_model.py"}


def _vision_model(directory: Path, artifact: Path, manifest, max_batch: int, preferred: list, options: TritonOptions) -> dict:
    version = directory / "1"
    version.mkdir(parents=True)
    gpu, kind = vision_config_gpu(manifest, max_batch, preferred, options)
    (directory / "config.pbtxt").write_text(gpu)
    (directory / "configs").mkdir()
    (directory / "configs" / "cpu.pbtxt").write_text(vision_config_cpu(manifest, max_batch, preferred, options))
    if kind == "tensorrt_plan":
        _link(inside(artifact, manifest.vision.engine.file), version / "model.plan")
    else:
        _link(inside(artifact, manifest.vision.file), version / "model.onnx")
        for name in manifest.files:  # external data keeps the file name the graph refers to
            if name.startswith(manifest.vision.file + ".") and name.endswith(".data"):
                _link(inside(artifact, name), version / name)
    shutil.copyfile(Path(__file__).parent / "models" / MODEL_SOURCES["vision"], version / "model.py")
    return {"gpu": kind, "cpu": "python"}


def _python_model(directory: Path, which: str, config: str) -> dict:
    version = directory / "1"
    version.mkdir(parents=True)
    (directory / "config.pbtxt").write_text(config)
    (directory / "configs").mkdir()
    (directory / "configs" / "cpu.pbtxt").write_text(config.replace("KIND_GPU", "KIND_CPU"))
    shutil.copyfile(Path(__file__).parent / "models" / MODEL_SOURCES[which], version / "model.py")
    return {"gpu": "python", "cpu": "python"}


LINK_FROM_BYTES = 64 << 20  # files this large are hard-linked; smaller ones (manifest, configs, tokenizer) copied


def _link(source: Path, target: Path) -> None:
    """A large file is hard-linked (no copy of a multi-GB graph when on the same filesystem), a small one copied:
    the manifest and configs are what a hand edit in the repository would touch, and an in-place write through a
    hard link would change the source artifact too (its hashes then fail ``verify``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.stat().st_size >= LINK_FROM_BYTES:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copyfile(source, target)


def _link_tree(artifact: Path, target: Path, manifest) -> None:
    for name in [*manifest.files, "manifest.json"]:
        _link(inside(artifact, name), target / name)
    if INPUT_NAME not in {i.name for i in manifest.vision.inputs}:  # pragma: no cover - guarded by the contract
        raise ConfigError("the vision graph's input is not pixel_values")
