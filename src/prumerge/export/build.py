"""``build``: checkpoint -> artifact directory (vision.onnx + manifest.json), staged and renamed at the end.

Stages: load the vision side, export, check the graph, validate onnxruntime against PyTorch, describe, hash.
Any failure removes the staging directory, so nothing that looks like an artifact is left behind.
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
from ..manifest import Manifest, describe_files, staged_directory
from ..reduce.config import EXTRA_TOKEN_INDEX, PADDING_INDEX, Method

VISION_FILE = "vision.onnx"
PACKAGES = ("prumerge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy")


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


Progress = Callable[[str], None]


def build_artifact(model: str, out: str | Path, options: BuildOptions = BuildOptions(), force: bool = False,
                   progress: Progress | None = None) -> Manifest:
    """Build the artifact for ``model`` (local checkpoint dir or hub id) into ``out``; return its manifest."""
    import numpy as np
    import onnx

    from ..encoder import PruMergeEncoder
    from ..runtime.preprocess import PreprocessConfig
    from .checks import check_onnx, op_support
    from .graph import INPUT_NAME, Contract, export_onnx, output_shapes
    from .validate import TOLERANCE, compare_outputs, require, synthetic_pixels

    step = progress or (lambda message: None)
    contract = Contract.parse(options.output)
    method = Method.parse(options.method)
    if options.max_tokens is not None and method is Method.NONE:
        raise ConfigError("--max-tokens applies to prumerge / prumerge+, not to method none")
    with staged_directory(out, force=force) as stage:
        step(f"loading the vision side of {model}")
        encoder = PruMergeEncoder.from_pretrained(
            model, method=method, project=options.project, revision=options.revision,
            capacity=options.max_tokens, **options.reducer_options,
        )
        precision = "fp16" if options.fp16 else "fp32"
        if options.fp16:
            encoder = encoder.half()

        step(f"exporting {method.value} ({contract.value} contract, opset {options.opset}) to ONNX")
        path = export_onnx(encoder, stage / VISION_FILE, contract, options.opset, options.batch_max)

        step("checking the graph (onnx.checker, TensorRT op support)")
        check_onnx(path)
        graph = onnx.load(str(path), load_external_data=False)
        support = op_support(graph)
        opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))

        step(f"validating onnxruntime against PyTorch on {options.validate_images} images")
        pixels = synthetic_pixels(options.validate_images, encoder.image_size)
        validation = require(_validate(encoder, path, pixels, TOLERANCE[precision], compare_outputs), "build validation")

        step("writing manifest")
        checkpoint_processor = _copy_processor_config(encoder.source.get("model"), options.revision, stage)
        preprocess = PreprocessConfig.from_processor_dict(checkpoint_processor, encoder.image_size)
        manifest = Manifest(
            source=encoder.source,
            reducer={
                "method": method.value,
                "options": encoder.reducer.to_dict(),
                "capacity": encoder.capacity,
                "num_patches": encoder.num_patches,
                "grid": encoder.grid,
                "patch_size": encoder.patch_size,
                "feature_layer": encoder.feature_index - (encoder.num_layers + 1),
                "extra_token_index": EXTRA_TOKEN_INDEX,
                "padding_index": PADDING_INDEX,
            },
            vision={
                "file": VISION_FILE,
                "format": "onnx",
                "opset": opset,
                "precision": precision,
                "contract": contract.value,
                "batch_max": options.batch_max,
                "projected": encoder.projector is not None,
                "output_width": encoder.output_width,
                "inputs": [{"name": INPUT_NAME, "dtype": "float32" if precision == "fp32" else "float16",
                            "shape": ["batch", 3, encoder.image_size, encoder.image_size]}],
                "outputs": _measured_outputs(path, output_shapes(encoder, contract), np),
                "tensorrt": support.to_dict(),
            },
            preprocess=preprocess.to_dict(),
            llm=_llm_info(encoder),
            validation=validation.to_dict(),
            packages=_package_versions() | {"python": platform.python_version()},
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        manifest.files = describe_files(stage)
        manifest.write(stage)
    step(f"artifact ready: {Path(out)}")
    return manifest


def _validate(encoder, path, pixels, tolerance, compare_outputs):
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtype = next(encoder.parameters()).dtype
    feed = pixels.astype("float16") if dtype == torch.float16 else pixels
    got = dict(zip(("tokens", "num_tokens", "indices", "truncated"), session.run(None, {"pixel_values": feed})))
    with torch.no_grad():
        ref = encoder(torch.from_numpy(feed))
    reference = {"tokens": ref.tokens.float().numpy(), "num_tokens": ref.num_tokens.numpy(), "indices": ref.indices.numpy()}
    return compare_outputs(reference, got, tolerance, "CPUExecutionProvider")


def _measured_outputs(path, declared: dict, np) -> list:
    """Output specs read back from the saved graph (what was built, not what was asked), named axes kept."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    specs = []
    for out in graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else declared[out.name][i] for i, d in enumerate(out.type.tensor_type.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type)
        specs.append({"name": out.name, "dtype": np.dtype(dtype).name, "shape": dims})
    return specs


def _copy_processor_config(source: str | None, revision: str | None, stage: Path) -> dict | None:
    from ..checkpoint import Checkpoint

    if source is None:
        return None
    path = Checkpoint.open(source, revision=revision).file("preprocessor_config.json", required=False)
    if path is None:
        return None
    shutil.copyfile(path, stage / "preprocessor_config.json")
    return json.loads(path.read_text())


def _llm_info(encoder) -> dict | None:
    """What the runtime must know of the language model to accept these tokens (the LLM itself comes later)."""
    config = getattr(encoder, "checkpoint_config", None)
    if config is None or getattr(config, "model_type", None) != "llava":
        return None
    text = config.text_config
    return {
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
