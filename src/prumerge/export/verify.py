"""``verify`` and ``inspect`` of a finished artifact directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ArtifactError, InputError
from ..artifact.manifest import Manifest, inside


MAX_VERIFY_IMAGES = 256  # each image runs through onnxruntime and PyTorch: a bound, not a memory error


def verify_artifact(directory: str | Path, images: int = 4, provider: str = "cpu", reference: bool = True, seed: int = 1,
                    expect_sha256: str | None = None) -> dict:
    """Re-hash every file, run the graph on onnxruntime and compare with the PyTorch reference rebuilt from the
    source checkpoint recorded in the manifest (``reference=False``: hashes and an onnxruntime run only)."""
    from ..runtime.vision import VisionSession
    from .validate import agreement, reference_output, require, synthetic_pixels, validate_against

    if isinstance(images, bool) or not isinstance(images, int) or not 1 <= images <= MAX_VERIFY_IMAGES:
        raise InputError(f"--images must be in 1..{MAX_VERIFY_IMAGES} (synthetic images compared), got {images}")
    session = VisionSession.open(directory, provider=provider, verify=True, expect_sha256=expect_sha256)
    manifest = session.manifest
    pixels = synthetic_pixels(images, session.image_size, seed=seed)
    question = session.probe_question(images)
    got = session.run_pixels(pixels, question)
    report = {"directory": str(directory), "files": len(manifest.files), "hashes": "ok", "manifest_sha256": manifest.sha256,
              "pinned": expect_sha256 is not None, "provider": session.provider,
              "num_tokens": got.num_tokens.tolist()}
    if manifest.llm is not None and manifest.llm.decoder:
        report["llm"] = check_decoder(directory, manifest, provider, got.image(0))
    if not reference:
        return report
    try:
        import torch
    except ImportError:  # a runtime-only install: hashes and the graph run are what can be checked here
        return report | {"reference": "skipped: the PyTorch comparison needs prumerge[export] (torch, transformers)"}

    from .reference import artifact_encoder

    try:
        encoder = artifact_encoder(manifest)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; use --no-reference to check hashes and the graph only") from exc
    if manifest.vision.precision == "fp16":
        encoder = encoder.half()
    if manifest.vision.precision == "int8":  # selection may move with quantised features: report agreement
        with torch.no_grad():
            ref = encoder(torch.from_numpy(pixels.astype(session.input_dtype)),
                          **{name: torch.from_numpy(array) for name, array in (question or {}).items()})
        result = agreement(reference_output(ref), got)
        if not np.isfinite(got.tokens).all():
            raise ArtifactError(f"verify {directory}: the INT8 graph produced non-finite tokens")
        return report | {"reference_int8_agreement": result.to_dict()}
    result = validate_against(encoder, got, pixels.astype(session.input_dtype), manifest.vision.precision, session.provider,
                              question)
    require(result, f"verify {directory}")
    return report | {"reference": result.to_dict()}


def check_decoder(directory, manifest, provider: str, visual: np.ndarray) -> str:
    """The decoder against its manifest (names, element types, heads: ``runtime.llm.check_decoder_io``) and one
    prefill of the first image's visual tokens and a few text tokens, whose logits must be finite: a manifest or a
    decoder altered to disagree is named here, not found by the first user's empty answer."""
    from ..runtime.llm import OnnxDecoder

    decoder = OnnxDecoder(Path(directory), manifest.llm, provider="cuda" if provider != "cpu" else "cpu")
    embeds = decoder.embed([0, 1, 2])
    if manifest.vision.projected:  # tokens the LLM takes as they are
        if visual.shape[-1] != manifest.llm.hidden_size:
            raise ArtifactError(f"verify {directory}: the vision graph's tokens are {visual.shape[-1]} wide, the LLM "
                                f"takes {manifest.llm.hidden_size}")
        embeds = np.concatenate([embeds, visual.astype(np.float32)])
    logits, _ = decoder.step(embeds, decoder.start(len(embeds) + 1))
    return f"ok: {manifest.llm.num_layers} layers, {manifest.llm.kv_dtype} cache, finite logits over {logits.shape[0]} tokens"


def inspect_artifact(directory: str | Path) -> dict:
    """Manifest essentials plus a graph summary (node count, op histogram, file sizes). Loads no weights; every
    file is verified first. Without onnx installed (a runtime-only install) the summary counts nodes per stage
    from the manifest's record instead of an op histogram."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    manifest.verify_files(directory)  # a tampered or truncated artifact is named, not summarised
    vision = manifest.vision.to_dict()
    stages = {stage: len(names) for stage, names in (vision.get("node_stages") or {}).items()}
    try:
        import onnx
    except ImportError:
        graph_summary = {"nodes": sum(stages.values()), "stages": stages, "ops": None,
                         "note": "install onnx (prumerge[export]) for the op histogram"}
    else:
        try:
            graph = onnx.load(str(inside(directory, manifest.vision.file)), load_external_data=False).graph
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ArtifactError(f"cannot read {directory / manifest.vision.file}: {exc}") from exc
        ops: dict = {}
        for node in graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        graph_summary = {"nodes": len(graph.node), "initializers": len(graph.initializer), "stages": stages,
                         "ops": dict(sorted(ops.items()))}
    return {
        "source": manifest.source.to_dict(),
        "reducer": manifest.reducer.to_dict(),
        "vision": {k: v for k, v in vision.items() if k not in ("tensorrt", "node_stages", "validation")},
        "tensorrt": vision.get("tensorrt"),
        "preprocess": manifest.preprocess.to_dict(),
        "llm": manifest.llm.to_dict() if manifest.llm else None,
        "validation": vision.get("validation"),
        "files": manifest.files,
        "graph": graph_summary,
        "manifest_sha256": manifest.sha256,
        "created_utc": manifest.created_utc,
        "packages": manifest.packages,
    }
