"""What a build measured about one vision graph, as the manifest records it: the TensorRT engine and its target,
the INT8 record and its selection agreement with fp32, the TensorRT op report per version. Read by attribute,
range-checked when read (``prumerge.artifact.fields``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..errors import ArtifactError
from .fields import Section, _choice, _integer, _number, _strings


@dataclasses.dataclass(frozen=True)
class EngineFacts:
    """A TensorRT engine built for this graph: its file, the options it was built with, and what it is tied to (the
    runtime compares ``tensorrt_version``, ``gpu`` and ``compute_capability`` with the machine it runs on)."""

    file: str
    options: dict  # EngineOptions.to_dict(): target, precision, workspace, batch profile
    tensorrt_version: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    plan: dict | None = None
    graph_precision: str | None = None
    fp32_layers: int = 0
    profile: dict | None = None

    @property
    def max_batch(self) -> int:
        return int(self.options["max_batch"])

    def device(self) -> dict:
        """What the engine is tied to, in ``artifact.engine.device_facts``'s form."""
        return {"tensorrt_version": self.tensorrt_version, "gpu": self.gpu, "compute_capability": self.compute_capability}

    @classmethod
    def parse(cls, data, where: str) -> "EngineFacts":
        if isinstance(data, cls):
            return data
        options = data.get("options") if isinstance(data, dict) else None
        if not isinstance(options, dict):
            raise ArtifactError(f"manifest field {where} must hold the engine's build options")
        _integer(options.get("max_batch"), f"{where}.options.max_batch", 1, 4096)
        if not isinstance(data.get("file"), str) or not data["file"]:
            raise ArtifactError(f"manifest field {where}.file must name the engine file")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ArtifactError(f"manifest field {where} has unknown field(s) {', '.join(unknown)}")
        _integer(data.get("fp32_layers", 0), f"{where}.fp32_layers", 0, 1 << 20)
        return cls(**data)


@dataclasses.dataclass
class SelectionAgreement(Section):
    """How much of one run's selection another keeps on the same images (the INT8 graph against the fp32 one it
    replaced): measured by ``prumerge.export.validate.agreement`` and recorded with the graph it measured."""

    images: int
    mean_jaccard: float  # of kept patch-index sets
    min_jaccard: float
    mean_count_diff: float  # |num_tokens candidate - reference|
    identical_selection: float  # share of images with identical kept indices
    mean_cosine: float  # of tokens kept by both (and the extra token), mean over images
    latency_ratio: float | None = None  # reference ms / candidate ms on the measuring machine (onnxruntime CPU)

    def check(self, where: str) -> None:
        _integer(self.images, f"{where}.images", 1, 1 << 20)
        for name in ("mean_jaccard", "min_jaccard", "identical_selection"):
            _number(getattr(self, name), f"{where}.{name}", 0.0, 1.0)
        _number(self.mean_count_diff, f"{where}.mean_count_diff", 0.0, float(1 << 16))
        _number(self.mean_cosine, f"{where}.mean_cosine", -1.01, 1.01)  # float64 rounding around +-1
        _number(self.latency_ratio, f"{where}.latency_ratio", 0.0, 1e6, optional=True)

    def line(self) -> str:
        return (f"mean Jaccard {self.mean_jaccard:.3f} vs fp32 (min {self.min_jaccard:.3f}, identical on "
                f"{self.identical_selection:.0%} of {self.images} images), mean cosine {self.mean_cosine:.4f}")


@dataclasses.dataclass
class Int8Record(Section):
    """How an INT8 graph was made (onnxruntime's static Q/DQ) and how its selection agrees with the fp32 graph it
    replaced. The vocabulary of methods and targets is the contract's: calibration imports it from here."""

    # static calibration over the image set (Q/DQ), or "per-token": activation scales per token at run time
    METHODS: ClassVar[tuple] = ("minmax", "entropy", "percentile", "per-token")
    TARGETS: ClassVar[tuple] = ("cpu", "tensorrt")  # tensorrt: symmetric int8 activations (explicit quantisation)

    format: str
    calibration_method: str
    calibration_images: int
    quantized_ops: list
    float_nodes: int
    per_channel: bool
    target: str
    activations: str
    float_layers: int
    seconds: float
    agreement: SelectionAgreement | None = None  # None only between quantising and comparing, never in a manifest
    float_parts: list = dataclasses.field(default_factory=list)  # tower parts ("embeddings", "layer N") kept float
    target_jaccard: float | None = None  # asked for (--int8-target-jaccard); agreement says what was reached
    # [part, mean Jaccard with only that tower part quantised], the measurement the choice was made from
    sensitivity: list = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.agreement = SelectionAgreement.from_dict(self.agreement, "int8.agreement")

    def check(self, where: str) -> None:
        _choice(self.format, f"{where}.format", ("QDQ", "MatMulInteger"))
        _choice(self.calibration_method, f"{where}.calibration_method", self.METHODS)
        _integer(self.calibration_images, f"{where}.calibration_images", 1, 1 << 20)
        _strings(self.quantized_ops, f"{where}.quantized_ops")
        _integer(self.float_nodes, f"{where}.float_nodes", 0, 1 << 24)
        _choice(self.per_channel, f"{where}.per_channel", (True, False))
        _choice(self.target, f"{where}.target", self.TARGETS)
        _choice(self.activations, f"{where}.activations", ("uint8", "int8 symmetric", "uint8 per token"))
        _integer(self.float_layers, f"{where}.float_layers", 0, 4096)
        _number(self.seconds, f"{where}.seconds", 0.0, 1e7)
        _strings(self.float_parts, f"{where}.float_parts")
        import re

        measured = {r[0] for r in self.sensitivity if isinstance(r, list) and r}
        for part in self.float_parts:
            if not re.fullmatch(r"embeddings|layer (0|[1-9]\d{0,3})", part) or (measured and part not in measured):
                raise ArtifactError(f"manifest field {where}.float_parts names {part!r}, not a tower part "
                                    "(\"embeddings\" or \"layer N\") that was measured")
        _number(self.target_jaccard, f"{where}.target_jaccard", 0.0, 1.0, optional=True)
        if not isinstance(self.sensitivity, list) or not all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) for r in self.sensitivity):
            raise ArtifactError(f"manifest field {where}.sensitivity must be a list of [part, jaccard] pairs")
        for i, (_, jaccard) in enumerate(self.sensitivity):
            _number(jaccard, f"{where}.sensitivity[{i}][1]", 0.0, 1.0)
        if self.agreement is None:
            raise ArtifactError(f"manifest field {where}.agreement is missing: an INT8 graph is recorded with its "
                                "agreement with fp32")

    def line(self) -> str:
        form = "per-token scales, compared" if self.calibration_method == "per-token" else f"{self.calibration_method}"
        kept = f"{self.float_layers} layer(s) kept float"
        if self.target_jaccard is not None:
            kept = f"{', '.join(self.float_parts) or 'no part'} kept float for a target Jaccard of {self.target_jaccard:g}"
        return (f"{form} on {self.calibration_images} images ({self.target} {self.format}, {kept}): "
                + (self.agreement.line() if self.agreement else "not compared"))


@dataclasses.dataclass
class OpSupport(Section):
    """Which of a graph's ops TensorRT's ONNX parser (of ``tensorrt_version``) accepts, and what to watch: made by
    ``prumerge.export.checks.op_support`` from its op table, recorded per TensorRT version."""

    tensorrt_version: str
    op_counts: dict
    unsupported: list
    violations: list  # restriction breaches (e.g. TopK K not constant or too large)
    data_dependent: list  # nodes whose output shape depends on data
    ok: bool = False  # derived (recomputed, never trusted): nothing unsupported, no restriction breached

    def __post_init__(self) -> None:
        self.ok = not self.unsupported and not self.violations

    def check(self, where: str) -> None:
        if not isinstance(self.tensorrt_version, str) or not self.tensorrt_version:
            raise ArtifactError(f"manifest field {where}.tensorrt_version must be a version string")
        if not isinstance(self.op_counts, dict) or not all(isinstance(k, str) for k in self.op_counts):
            raise ArtifactError(f"manifest field {where}.op_counts must map op names to counts")
        for name, count in self.op_counts.items():
            _integer(count, f"{where}.op_counts.{name}", 0, 1 << 24)
        for name in ("unsupported", "violations", "data_dependent"):
            _strings(getattr(self, name), f"{where}.{name}")

    def summary(self) -> str:
        lines = [f"TensorRT {self.tensorrt_version} ONNX parser: {'all ops supported' if self.ok else 'NOT compatible'}"]
        if self.unsupported:
            lines.append("  unsupported ops: " + ", ".join(self.unsupported))
        lines += [f"  restriction: {v}" for v in self.violations]
        if self.data_dependent:
            lines.append("  data-dependent shapes at: " + ", ".join(self.data_dependent))
        else:
            lines.append("  no data-dependent shapes (static output buffers)")
        return "\n".join(lines)

    def line(self) -> str:
        return "ok" if self.ok else "NOT compatible (" + ", ".join(self.unsupported + self.violations)[:120] + ")"


def _op_support(data, where: str) -> dict:
    """``{TensorRT version: OpSupport}``."""
    if not isinstance(data, dict) or not all(isinstance(k, str) and k for k in data):
        raise ArtifactError(f"manifest field {where} must map TensorRT versions to op-support reports")
    return {version: OpSupport.from_dict(report, f"{where}.{version}") for version, report in data.items()}


@dataclasses.dataclass
class EngineTarget(Section):
    """The engine this graph is meant for (``build --target``): the settings ``build_engine.sh`` builds it with and
    the precision plan (how the graph's precision maps to TensorRT's flags)."""

    target: str
    precision: str
    workspace_mib: int
    min_batch: int
    opt_batch: int
    max_batch: int
    timing_cache: str | None
    plan: dict  # {"strongly_typed": bool, "fp16": bool, "pin_fp32": bool}
    opt_question_rows: int = 32  # the question inputs' token axis (a question-reading graph's profile)
    max_question_rows: int = 256

    def check(self, where: str) -> None:
        _integer(self.opt_question_rows, f"{where}.opt_question_rows", 1, 4096)
        _integer(self.max_question_rows, f"{where}.max_question_rows", self.opt_question_rows, 4096)
        if not isinstance(self.target, str) or not self.target:
            raise ArtifactError(f"manifest field {where}.target must name a target")
        _choice(self.precision, f"{where}.precision", ("fp32", "fp16", "int8"))
        _integer(self.workspace_mib, f"{where}.workspace_mib", 16, 1 << 24)
        for name in ("min_batch", "opt_batch", "max_batch"):
            _integer(getattr(self, name), f"{where}.{name}", 1, 4096)
        if self.timing_cache is not None and not isinstance(self.timing_cache, str):
            raise ArtifactError(f"manifest field {where}.timing_cache must be a path or null")
        if (not isinstance(self.plan, dict) or set(self.plan) != {"strongly_typed", "fp16", "pin_fp32"}
                or not all(isinstance(v, bool) for v in self.plan.values())):
            raise ArtifactError(f"manifest field {where}.plan must hold the booleans strongly_typed, fp16, pin_fp32")
