"""``prumerge.latency.run``: the whole pipeline per method, on the same images, with per-stage statistics.

Each measured run generates an answer for every image (warm-up runs first, excluded). Stage times come from the
pipeline's own stopwatch; the vision graph's wall time is split into encoder / reducer / projector by the share
each stage has in onnxruntime's per-node profile of the measured runs (see :mod:`prumerge.latency.node_profile`).
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ConfigError, InputError
from ..artifact.contract import METHODS, check_method_request
from ..artifact.manifest import Manifest, inside
from ..artifact.node_stages import expand
from ..artifact.node_stages import classify_nodes
from .node_profile import STAGES, node_times
from .stats import peak_rss_mb, summarize

SCHEMA_VERSION = 1
STAGE_ORDER = ("preprocess", "vision_encoder", "reducer", "projector", "vision_other", "embed", "llm_prefill", "decode")
DEFAULT_PROMPT = "<image>\nDescribe the image."


@dataclasses.dataclass
class MethodProfile:
    method: str
    artifact: str
    graph: str
    samples: int
    stages: dict  # stage -> summary (ms); also end_to_end, ttft, vision (whole graph)
    decode_ms_per_token: dict
    tokens_per_s: dict
    visual_tokens: dict  # mean / min / max per image
    generated_tokens: dict
    overhead_ms: dict  # end_to_end minus the sum of the stages, per run
    node_share: dict  # share of each vision stage in the per-node profile
    peak_rss_mb: float  # process peak after this method's runs
    peak_device_mb: float | None
    artifact_mb: dict = dataclasses.field(default_factory=dict)  # on disk by part (latency.memory.artifact_parts)
    positions_max: int = 0  # the most positions (prompt + generated) a run reached
    kv_cache_mb: float | None = None  # the decoder's KV cache at positions_max


@dataclasses.dataclass
class ProfileReport:
    config: dict
    methods: list
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def method(self, name: str) -> MethodProfile:
        return next(m for m in self.methods if m.method == name)


def resolve_methods(artifacts: Sequence[Path], methods: Sequence[str] | None) -> dict:
    """``{method: (artifact dir, graph)}``: each method from the first artifact that has it; ``methods=None``:
    every method the artifacts provide, in the order none, prumerge, prumerge+."""
    methods = check_method_request(artifacts, methods)
    found = {}
    for directory in artifacts:
        manifest = Manifest.read(directory)
        main = manifest.vision.method
        found.setdefault(main, (Path(directory), "vision"))
        if manifest.baseline:
            found.setdefault("none", (Path(directory), "baseline"))
    if not methods:
        return {m: found[m] for m in METHODS if m in found}
    missing = [m for m in methods if m not in found]
    if missing:
        have = ", ".join(sorted(found)) or "nothing"
        raise ConfigError(f"no artifact provides {', '.join(missing)} (these provide {have}); build one with "
                          "--method for it, or --baseline for none")
    return {m: found[m] for m in methods}


def run(artifacts: Sequence[str | Path], methods: Sequence[str] | None = None, images: Sequence | None = None,
        synthetic: int = 0, prompt: str = DEFAULT_PROMPT, warmup: int = 1, runs: int = 5, provider: str = "cpu",
        max_new_tokens: int = 16, progress: Callable[[str, int], None] | None = None) -> ProfileReport:
    """Profile ``methods`` side by side; ``images`` (paths or PIL images) or ``synthetic`` generated ones."""
    from ..runtime.pipeline import Pipeline, SamplingParams
    from ..runtime.vision import VisionSession

    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")
    images = list(images or [])
    for image in images:
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise InputError(f"image file not found: {image}")
    if synthetic:
        from ..samples import synthetic_images

        images += synthetic_images(synthetic)
    if not images:
        raise InputError("no images: give image paths or a number of synthetic images")
    chosen = resolve_methods([Path(a) for a in artifacts], methods)
    sampling = SamplingParams(max_new_tokens)  # greedy: every method answers the same way it is timed
    tick = progress or (lambda label, n: None)
    results = []
    for method, (directory, graph) in chosen.items():
        # timed without onnxruntime's profiler (it adds a cost per node, so graphs of many small nodes, such as an
        # unrolled greedy reducer, would read slower than they run); the node shares come from a second, profiled
        # session of the same graph run over the same images
        pipeline = Pipeline.from_artifacts(directory, provider=provider, method="none" if graph == "baseline" else None)
        for i in range(warmup):
            pipeline.generate(images[i % len(images)], prompt, sampling=sampling)
            tick(f"{method}: warm-up", 1)
        samples = []
        for _ in range(runs):
            for image in images:
                samples.append(pipeline.generate(image, prompt, sampling=sampling))
                tick(f"{method}: measuring", 1)
        with tempfile.TemporaryDirectory(prefix="prumerge-profile-") as scratch:
            profiled = VisionSession.open(directory, provider=provider, verify=False, graph=graph, profile_dir=scratch)
            question = pipeline.question(prompt, 1) if profiled.needs_question else None
            for image in [images[i % len(images)] for i in range(warmup)] + list(images) * runs:
                profiled.run([image], question)
            shares = node_times(profiled.end_profiling(), _node_stages(directory, profiled.graph), skip_runs=warmup)
        results.append(_method_profile(method, directory, graph, samples, shares, pipeline))
    return ProfileReport(
        config={"artifacts": [str(a) for a in artifacts], "methods": list(chosen), "images": len(images),
                "synthetic": synthetic, "prompt": prompt, "warmup": warmup, "runs": runs, "provider": provider,
                "max_new_tokens": max_new_tokens, "machine": platform.machine(), "processor": platform.processor(),
                "python": platform.python_version()},
        methods=results,
    )


def _method_profile(method, directory, graph, samples, node_ms, pipeline) -> MethodProfile:
    from .memory import artifact_parts, kv_cache_mb

    total_node = sum(node_ms.values()) or 1.0
    share = {stage: node_ms[stage] / total_node for stage in STAGES}
    per_stage = {name: [] for name in (*STAGE_ORDER, "vision", "end_to_end", "ttft")}
    overhead = []
    for result in samples:
        t = result.timings_ms
        vision = t.get("vision", 0.0)
        values = {"preprocess": t.get("preprocess", 0.0), "embed": t.get("embed", 0.0), "llm_prefill": t["prefill"],
                  "decode": t["decode"], **{stage: vision * share[stage] for stage in STAGES}}
        for name, value in values.items():
            per_stage[name].append(value)
        per_stage["vision"].append(vision)
        per_stage["end_to_end"].append(t["total"])
        per_stage["ttft"].append(t["ttft"])
        overhead.append(t["total"] - sum(values.values()))
    return MethodProfile(
        method=method, artifact=str(directory), graph=graph, samples=len(samples),
        stages={name: summarize(values) for name, values in per_stage.items()},
        decode_ms_per_token=summarize(r.timings_ms["decode_ms_per_token"] for r in samples),
        tokens_per_s=summarize(r.timings_ms["tokens_per_s"] for r in samples),
        visual_tokens=_counts(sum((r.visual_tokens for r in samples), [])),
        generated_tokens=_counts([r.generated_tokens for r in samples]),
        overhead_ms=summarize(overhead),
        node_share={k: round(v, 4) for k, v in share.items()},
        peak_rss_mb=peak_rss_mb(),
        peak_device_mb=None,
        artifact_mb=artifact_parts(pipeline.vision.manifest, pipeline.vision.graph),
        positions_max=(positions := max(r.prompt_tokens + r.generated_tokens for r in samples)),
        kv_cache_mb=kv_cache_mb(pipeline.vision.manifest.llm, positions),
    )


def _counts(values) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else {}


def _node_stages(directory: Path, graph: dict) -> dict:
    """The build's record of which node is which stage; read from the graph itself for artifacts built before it
    was recorded (needs onnx)."""
    if graph.node_stages:
        return expand(graph.node_stages)
    return classify_nodes(inside(directory, graph.file))
