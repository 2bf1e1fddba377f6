"""The PyTorch encoder an artifact's graph was built from, rebuilt from what its manifest records: the one reader of
those facts (``verify`` compares the graph with it, ``inspect IMAGE --model ARTIFACT`` draws with it).

What it reads: the source (model, revision, original layout with its base and tower), the reducer's options, the
graph's method, capacity and projection, and the input size. An original-layout checkpoint is converted vision side
only (tower + projector): rebuilding a reference never writes the language model.
"""

from __future__ import annotations

from ..artifact.contract import ADAPTIVE_METHODS
from ..artifact.manifest import Manifest
from ..errors import ArtifactError, CheckpointError


def artifact_encoder(manifest: Manifest, graph: str = "vision", method: str | None = None, project: bool | None = None,
                     capacity: bool = True, **reducer_overrides):
    """The ``PruMergeEncoder`` of ``manifest``'s ``graph`` (vision | baseline). ``method`` / ``project`` /
    ``reducer_overrides``: what to change from the built graph (``inspect`` draws an untruncated reduction without
    the projector); ``capacity=False`` leaves the graph's capacity out."""
    from ..model.encoder import PruMergeEncoder
    from .convert import as_llava_hf

    section = manifest.baseline if graph == "baseline" else manifest.vision
    if section is None:
        raise ArtifactError(f"the artifact has no {graph} graph")
    source = manifest.source
    original = source.layout == "llava-original"
    options = {**manifest.reducer.options, **reducer_overrides}
    adaptive = (method or section.method) in ADAPTIVE_METHODS  # fixed-count methods take no capacity
    if capacity and adaptive and section.method != "none":  # the graph owns its capacity (--max-tokens or calibration)
        options["capacity"] = section.capacity
    elif not adaptive:
        options.pop("capacity", None)
    try:
        with as_llava_hf(source.model, source.base if original else None, source.vision_tower if original else None,
                         vision_only=True) as (checkpoint, _):
            encoder = PruMergeEncoder.from_pretrained(
                checkpoint, method=method or section.method, project=section.projected if project is None else project,
                revision=source.revision, image_size=manifest.reducer.image_size, **options)
    except CheckpointError as exc:
        raise ArtifactError(f"cannot rebuild the PyTorch encoder from {source.model!r} ({exc})") from exc
    return encoder  # in memory: the vision-side conversion (if any) is already gone
