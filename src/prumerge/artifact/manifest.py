"""The artifact contract: ``manifest.json``, the only thing a build and a run share (stdlib only).

The build records what it *measured* (real output shapes, validation errors, file hashes), not what it intended;
the runtime trusts nothing else.

What the hashes protect against, and what not: every file's sha256 is in the manifest and the manifest carries a
hash of itself, so corruption, truncation, a half-copied directory or an edit of any one file is refused. Anyone
can recompute the manifest's own hash, so it is no protection against a deliberate edit of the whole artifact.
For that, pin the manifest's hash you got from the builder out of band (``run/verify --expect-sha256``): every
file is checked against the pinned manifest. Every path a manifest names is confined to the artifact directory
(no absolute paths, no ``..``, no links out), and every file the runtime opens must be listed and hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import posixpath
from pathlib import Path, PurePosixPath
from typing import ClassVar

from ..errors import ArtifactError
from .preprocess_config import PreprocessConfig
from .contract import ADAPTIVE_METHODS, METHODS

FORMAT = "prumerge-artifact"
FORMAT_VERSION = 3  # 2: typed sections, one owner per fact; 3: the decoder's cache names written out per layer
MANIFEST_NAME = "manifest.json"


class Section:
    """A typed manifest section: its fields are attributes (read as ``graph.file``, never by string key), parsed
    and range-checked once when the manifest is read.

    Unknown keys are refused when read: a fact the reader does not know is a fact it would silently drop.
    """

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def _names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data, where: str):
        if data is None:
            return None
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ArtifactError(f"manifest section {where} is not an object")
        unknown = sorted(set(data) - set(cls._names()))
        if unknown:
            raise ArtifactError(f"manifest section {where} has unknown field(s) {', '.join(unknown)}; rebuild the artifact "
                                "with this version of prumerge-export")
        try:
            section = cls(**data)
        except TypeError as exc:
            raise ArtifactError(f"manifest section {where} lacks required fields: {exc}") from exc
        section.check(where)
        return section

    def check(self, where: str) -> None:
        """Refuse field values of the wrong type or outside their range (a manifest is input: its numbers size
        buffers and loops, and its strings become format templates)."""


def _integer(value, where: str, low: int, high: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ArtifactError(f"manifest field {where} must be an integer in {low}..{high}, got {value!r}")


def _choice(value, where: str, allowed, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise ArtifactError(f"manifest field {where} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _number(value, where: str, low: float, high: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise ArtifactError(f"manifest field {where} must be a number in {low:g}..{high:g}, got {value!r}")


def _strings(value, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ArtifactError(f"manifest field {where} must be a list of strings")


_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8", "int8")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as built: name, element type, shape (sizes, or axis names such as ``batch``)."""

    name: str
    dtype: str
    shape: list

    @classmethod
    def parse(cls, spec, where: str) -> "TensorSpec":
        if isinstance(spec, cls):
            return spec
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ArtifactError(f"manifest field {where} must be an object with a name")
        _choice(spec.get("dtype"), f"{where}.dtype", _DTYPES)
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all((isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 20)
                                                  or (isinstance(d, str) and d) for d in shape):
            raise ArtifactError(f"manifest field {where}.shape must be a list of sizes (0..{1 << 20}) or axis names")
        unknown = sorted(set(spec) - {"name", "dtype", "shape"})
        if unknown:
            raise ArtifactError(f"manifest field {where} has unknown field(s) {', '.join(unknown)}")
        return cls(spec["name"], spec["dtype"], list(shape))


def _tensor_specs(specs, where: str) -> list:
    if not isinstance(specs, list) or not specs:
        raise ArtifactError(f"manifest field {where} must be a non-empty list of tensor specs")
    return [TensorSpec.parse(spec, f"{where}[{i}]") for i, spec in enumerate(specs)]


@dataclasses.dataclass(frozen=True)
class DecoderIO:
    """The decoder's input and output names, one name per layer for the cache (written out by the build from the
    builder's per-layer templates, so the runtime formats nothing it reads from a manifest)."""

    inputs_embeds: str
    attention_mask: str
    logits: str
    past_keys: list
    past_values: list
    present_keys: list
    present_values: list

    @classmethod
    def from_templates(cls, io: dict, layers: int) -> "DecoderIO":
        """From onnxruntime-genai's ``genai_config.json`` names (``past_key_values.%d.key``...): build side only."""
        names = {kind: [io[f"{kind}_names"] % i for i in range(layers)]
                 for kind in ("past_key", "past_value", "present_key", "present_value")}
        return cls(io["inputs_embeds"], io["attention_mask"], io["logits"], names["past_key"], names["past_value"],
                   names["present_key"], names["present_value"])

    @classmethod
    def parse(cls, data, where: str, layers: int) -> "DecoderIO":
        if isinstance(data, cls):
            return data
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(fields):
            raise ArtifactError(f"manifest field {where} must name the decoder's {', '.join(fields)}")
        for name in fields[:3]:
            if not isinstance(data[name], str) or not data[name]:
                raise ArtifactError(f"manifest field {where}.{name} must be a tensor name")
        for name in fields[3:]:
            names = data[name]
            if not isinstance(names, list) or len(names) != layers or not all(isinstance(n, str) and n for n in names):
                raise ArtifactError(f"manifest field {where}.{name} must list one tensor name per layer ({layers})")
        return cls(**data)

    def cache_names(self) -> list:
        """``[(past input, present output)]``: keys of every layer, then values."""
        return list(zip(self.past_keys, self.present_keys)) + list(zip(self.past_values, self.present_values))


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

    def check(self, where: str) -> None:
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


def _preprocess(data) -> PreprocessConfig:
    """The preprocessing config, parsed once and range-checked (its sizes become resize and crop allocations)."""
    if isinstance(data, PreprocessConfig):
        return data
    try:
        config = PreprocessConfig.from_dict(data)
    except (TypeError, KeyError, ValueError) as exc:
        raise ArtifactError(f"manifest section preprocess is malformed: {exc}") from exc
    _integer(config.image_size, "preprocess.image_size", 1, 16384)
    for name in ("resize_shortest_edge", "crop_height", "crop_width"):
        _integer(getattr(config, name), f"preprocess.{name}", 1, 16384, optional=True)
    _integer(config.resample, "preprocess.resample", 0, 5)
    for name in ("image_mean", "image_std"):
        values = getattr(config, name)
        if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ArtifactError(f"manifest field preprocess.{name} must be three finite numbers")
    if not all(config.image_std) or not (isinstance(config.rescale_factor, (int, float)) and math.isfinite(config.rescale_factor)):
        raise ArtifactError("manifest field preprocess.image_std must be non-zero and rescale_factor finite")
    return config


@dataclasses.dataclass
class SourceSection(Section):
    """Where the build came from (what the user named, not a temporary conversion)."""

    model: str | None
    revision: str | None = None
    fingerprint: str | None = None
    model_type: str | None = None
    layout: str | None = None  # "llava-original" when converted from the original LLaVA layout
    lora: bool | None = None
    base: str | None = None
    vision_tower: str | None = None
    lora_targets: int | None = None
    image_token_id: int | None = None


@dataclasses.dataclass
class ReducerSection(Section):
    """How patches are scored and merged, and on what grid. The method and capacity of each graph live in that
    graph's section (the baseline graph has its own)."""

    options: dict
    num_patches: int
    grid: int
    patch_size: int
    image_size: int
    feature_layer: int
    extra_token_index: int = -1
    padding_index: int = -2
    cls_token_index: int = -3  # VisionZip's CLS token
    contextual_token_index: int = -4  # VisionZip's merged contextual tokens

    def check(self, where: str) -> None:
        if not isinstance(self.options, dict) or not all(
                isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in self.options.items()):
            raise ArtifactError(f"manifest field {where}.options must map option names to plain values")
        _integer(self.num_patches, f"{where}.num_patches", 1, 1 << 20)
        _integer(self.grid, f"{where}.grid", 1, 4096)
        _integer(self.patch_size, f"{where}.patch_size", 1, 4096)
        _integer(self.image_size, f"{where}.image_size", 1, 16384)
        _integer(self.feature_layer, f"{where}.feature_layer", -4096, 4096)
        for name in ("extra_token_index", "padding_index", "cls_token_index", "contextual_token_index"):
            _integer(getattr(self, name), f"{where}.{name}", -64, -1)
        if self.grid * self.grid != self.num_patches or self.image_size // self.patch_size != self.grid:
            raise ArtifactError(f"manifest section {where} is inconsistent: a {self.grid}x{self.grid} grid of "
                                f"{self.patch_size}-px patches is not {self.num_patches} patches of a {self.image_size}-px image")


@dataclasses.dataclass
class ValidationSection(Section):
    """onnxruntime against PyTorch at build time, token by token (see ``prumerge.export.validate``)."""

    images: int
    counts_identical: bool
    indices_identical: bool
    max_abs_error: float
    tolerance: float
    provider: str
    tokens: int = 0
    tokens_exact: int = 0
    near_ties: int = 0
    unexplained: int = 0
    worst_unexplained: float = 0.0
    near_tie_epsilon: float = 0.0
    worst_explained: float = 0.0
    # reduced precision only (fp16): images whose selection differs but is one the reference's scores allow within
    # selection_epsilon (see prumerge.export.validate.SELECTION_EPSILON), and those it does not
    selection_moved: int = 0
    selection_unexplained: int = 0
    selection_epsilon: float = 0.0
    ok: bool = False  # derived (recomputed, never trusted): every selection identical or explained, no unexplained token

    def __post_init__(self) -> None:
        identical = self.counts_identical and self.indices_identical
        self.ok = bool((identical or self.selection_moved) and self.selection_unexplained == 0 and self.unexplained == 0)

    def line(self) -> str:
        """One line for ``build``'s table: identical counts / indices, tokens within tolerance, worst error."""
        return (f"{self.images} images: counts identical={self.counts_identical}, indices identical={self.indices_identical}; "
                f"{self.tokens_exact} tokens within {self.tolerance:g}, {self.near_ties} explained by near-ties, "
                f"{self.unexplained} unexplained; max |err|={self.max_abs_error:.2e}"
                + (f"; selection moved within the fp16 rule on {self.selection_moved} image(s)" if self.selection_moved else ""))

    def summary(self) -> str:
        moved = ""
        if self.selection_moved or self.selection_unexplained:
            moved = (f"; selection moved on {self.selection_moved} image(s) within the fp16 rule "
                     f"(epsilon {self.selection_epsilon:g}), on {self.selection_unexplained} beyond it")
        return (f"{self.tokens} tokens on {self.images} images: {self.tokens_exact} within {self.tolerance:g}, "
                f"{self.near_ties} explained by near-ties (worst {self.worst_explained:.2g}), "
                f"{self.unexplained} unexplained (worst {self.worst_unexplained:.2g}){moved}")


@dataclasses.dataclass
class GraphSection(Section):
    """One vision graph as built and read back (I/O specs from the saved graph, op support, node stages)."""

    file: str
    format: str
    method: str
    opset: int
    precision: str
    contract: str
    batch_max: int
    capacity: int
    projected: bool
    output_width: int
    inputs: list  # [TensorSpec]
    outputs: list  # [TensorSpec]
    tensorrt: dict  # {TensorRT version: OpSupport}
    simplified: dict | None = None
    node_stages: dict | None = None
    int8: Int8Record | None = None
    engine: EngineFacts | None = None
    tensorrt_target: EngineTarget | None = None
    validation: ValidationSection | None = None  # this graph against PyTorch at build time
    # "fused": the encoder's attention is ONNX's Attention op (opset 23: onnxruntime >= 1.23 runs it, TensorRT 10.3
    # parses it not); "plain": MatMul + Softmax, which every runtime here runs
    attention: str = "plain"

    def __post_init__(self) -> None:
        self.validation = ValidationSection.from_dict(self.validation, f"{self.file}.validation")
        self.tensorrt = _op_support(self.tensorrt, f"{self.file}.tensorrt")
        self.int8 = Int8Record.from_dict(self.int8, f"{self.file}.int8")
        self.tensorrt_target = EngineTarget.from_dict(self.tensorrt_target, f"{self.file}.tensorrt_target")

    def check(self, where: str) -> None:
        if not isinstance(self.file, str) or not self.file:
            raise ArtifactError(f"manifest field {where}.file must be a file name")
        _choice(self.format, f"{where}.format", ("onnx",))
        _choice(self.method, f"{where}.method", METHODS)
        _integer(self.opset, f"{where}.opset", 1, 100)
        _choice(self.attention, f"{where}.attention", ("fused", "plain"))
        _choice(self.precision, f"{where}.precision", ("fp32", "fp16", "int8"))
        _choice(self.contract, f"{where}.contract", ("padded", "dynamic"))
        _integer(self.batch_max, f"{where}.batch_max", 1, 4096)
        _integer(self.capacity, f"{where}.capacity", 1, 1 << 16)
        _integer(self.output_width, f"{where}.output_width", 1, 1 << 16)
        self.inputs = _tensor_specs(self.inputs, f"{where}.inputs")
        self.outputs = _tensor_specs(self.outputs, f"{where}.outputs")
        shape = self.inputs[0].shape
        if len(shape) != 4 or not all(isinstance(d, int) and 1 <= d for d in shape[1:]):
            raise ArtifactError(f"manifest field {where}.inputs[0].shape must be [batch, 3, size, size], got {shape}")
        if self.engine is not None:
            self.engine = EngineFacts.parse(self.engine, f"{where}.engine")
        if self.node_stages is not None and (not isinstance(self.node_stages, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(n, str) for n in v)
                for k, v in self.node_stages.items())):
            raise ArtifactError(f"manifest field {where}.node_stages must map stage names to lists of node names")


@dataclasses.dataclass
class LLMSection(Section):
    """The language model: facts known from the checkpoint, and the decoder's geometry when one was built."""

    model_type: str
    hidden_size: int
    vocab_size: int
    image_token_id: int | None = None
    decoder: str | None = None
    directory: str | None = None
    builder: str | None = None
    precision: str | None = None
    provider: str | None = None
    embeddings: str | None = None
    tokenizer: str | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_size: int | None = None
    context_length: int | None = None
    io: DecoderIO | None = None
    has_position_ids: bool | None = None
    kv_dtype: str | None = None
    embeds_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list | None = None
    add_bos: bool | None = None
    prompt_format: str | None = None
    image_marker: str | None = None
    kv_share_buffer: bool | None = None  # the decoder writes into one preallocated KV buffer (GQA), no copy per step
    logits: str | None = None  # "last": one row per step (LM head on the last position only); "all"/None: every row
    # an int8 KV cache's record (prumerge.export.kv_cache): {dtype, scales, rotary_envelope, calibration}; None: float
    kv_cache: dict | None = None

    def check(self, where: str) -> None:
        _integer(self.hidden_size, f"{where}.hidden_size", 1, 1 << 16)
        _integer(self.vocab_size, f"{where}.vocab_size", 1, 1 << 22)
        _integer(self.num_layers, f"{where}.num_layers", 1, 1024, optional=True)
        _integer(self.num_kv_heads, f"{where}.num_kv_heads", 1, 1024, optional=True)
        _integer(self.head_size, f"{where}.head_size", 1, 4096, optional=True)
        _integer(self.context_length, f"{where}.context_length", 1, 1 << 21, optional=True)
        for name in ("image_token_id", "bos_token_id"):
            _integer(getattr(self, name), f"{where}.{name}", 0, self.vocab_size, optional=True)
        if self.eos_token_ids is not None and (not isinstance(self.eos_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in self.eos_token_ids)):
            raise ArtifactError(f"manifest field {where}.eos_token_ids must be a list of token ids < {self.vocab_size}")
        _choice(self.kv_dtype, f"{where}.kv_dtype", _DTYPES, optional=True)
        _choice(self.embeds_dtype, f"{where}.embeds_dtype", _DTYPES, optional=True)
        _choice(self.logits, f"{where}.logits", ("last", "all"), optional=True)
        if self.kv_cache is not None and (not isinstance(self.kv_cache, dict) or self.kv_cache.get("dtype") != "int8"
                                          or self.kv_dtype != "int8"):
            raise ArtifactError(f"manifest field {where}.kv_cache must record an int8 cache (dtype \"int8\") of a "
                                "decoder whose kv_dtype is int8")
        if self.prompt_format is not None:
            fmt = self.prompt_format
            try:
                ok = isinstance(fmt, str) and fmt.count("{prompt}") == 1 and fmt.format(prompt="\x00").count("\x00") == 1
            except (IndexError, KeyError, ValueError, AttributeError):
                ok = False
            if not ok:
                raise ArtifactError(f"manifest field {where}.prompt_format must hold exactly one {{prompt}} slot and no "
                                    "other format field")
        if self.decoder is not None:
            for name in ("directory", "embeddings", "tokenizer"):
                if not isinstance(getattr(self, name), str) or not getattr(self, name):
                    raise ArtifactError(f"manifest field {where}.{name} must be a path in the artifact")
            for name in ("num_layers", "num_kv_heads", "head_size", "context_length", "kv_dtype", "embeds_dtype",
                         "prompt_format"):
                if getattr(self, name) is None:
                    raise ArtifactError(f"manifest field {where}.{name} is required with a decoder")
            if not isinstance(self.image_marker, str) or not self.image_marker:
                raise ArtifactError(f"manifest field {where}.image_marker must be the prompt's image placeholder")
            _choice(self.add_bos, f"{where}.add_bos", (True, False), optional=True)
            self.io = DecoderIO.parse(self.io, f"{where}.io", self.num_layers)


_SECTIONS = {"source": SourceSection, "reducer": ReducerSection, "vision": GraphSection, "baseline": GraphSection,
             "llm": LLMSection}


@dataclasses.dataclass
class Manifest:
    source: SourceSection
    reducer: ReducerSection
    vision: GraphSection
    preprocess: PreprocessConfig  # prumerge.artifact.preprocess_config owns its fields
    llm: LLMSection | None = None
    baseline: GraphSection | None = None  # the unreduced (method none) graph, when the build exported it
    packages: dict = dataclasses.field(default_factory=dict)
    files: dict = dataclasses.field(default_factory=dict)
    created_utc: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, section in _SECTIONS.items():
            setattr(self, name, section.from_dict(getattr(self, name), name))
        self.preprocess = _preprocess(self.preprocess)
        if not isinstance(self.files, dict) or not all(
                isinstance(name, str) and isinstance(meta, dict) and isinstance(meta.get("sha256"), str)
                and len(meta["sha256"]) == 64 and isinstance(meta.get("bytes"), int) and not isinstance(meta["bytes"], bool)
                and meta["bytes"] >= 0 for name, meta in self.files.items()):
            raise ArtifactError("manifest field files must map each file name to its bytes and sha256")
        # the image size is recorded by three owners (reducer, preprocessing, each graph's input): they must agree
        sizes = {"reducer.image_size": self.reducer.image_size, "preprocess.image_size": self.preprocess.image_size}
        for name, graph in (("vision", self.vision), ("baseline", self.baseline)):
            if graph is not None:
                sizes[f"{name}.inputs[0].shape"] = tuple(graph.inputs[0].shape[2:])
        if len({v if isinstance(v, tuple) else (v, v) for v in sizes.values()}) != 1:
            raise ArtifactError("the manifest's image sizes disagree (" + ", ".join(f"{k} {v}" for k, v in sizes.items())
                                + "): it does not describe one artifact")

    @property
    def validation(self) -> ValidationSection | None:
        """The main graph's validation (each graph section owns its own)."""
        return self.vision.validation

    @property
    def method(self) -> str:
        """The method of the artifact's main vision graph."""
        return self.vision.method

    def summary_rows(self) -> list:
        """``[(label, text)]``: what ``build`` and ``inspect`` print about this artifact."""
        vision, reducer, validation = self.vision, self.reducer, self.validation
        rows = [("source", str(self.source.model)),
                ("method", f"{vision.method}  " + (f"(capacity {vision.capacity} of {reducer.num_patches} patches + extra)"
                                                   if vision.method in ADAPTIVE_METHODS else
                                                   f"({vision.capacity} tokens of {reducer.num_patches} patches)")),
                ("graph", f"{vision.file}  {vision.contract} contract, opset {vision.opset} ({vision.attention} "
                          f"attention), {vision.precision}"),
                ("outputs", "; ".join(f"{o.name} {o.shape} {o.dtype}" for o in vision.outputs))]
        if validation is not None:
            rows.append(("validation", validation.line()))
        rows.append(("input", f"{reducer.image_size} px, {reducer.grid}x{reducer.grid} patches"))
        if vision.int8:
            rows.append(("INT8", vision.int8.line()))
        rows.append(("TensorRT", "; ".join(f"{version}: {report.line()}" for version, report in vision.tensorrt.items())))
        llm = self.llm
        rows.append(("LLM", f"{llm.model_type} {llm.precision} decoder ({llm.builder}), hidden {llm.hidden_size}"
                     if llm is not None and llm.decoder else "none in this artifact"))
        if self.baseline:
            rows.append(("baseline", f"{self.baseline.file} (method none, {self.baseline.capacity} tokens)"))
        rows.append(("files", ", ".join(f"{n} ({m['bytes'] / 1e6:.1f} MB)" for n, m in self.files.items())))
        rows.append(("manifest sha256", f"{self.sha256}  (publish it; users pin it with --expect-sha256)"))
        return rows

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["manifest_sha256"] = _self_hash(data)
        return data

    def write(self, directory: Path) -> Path:
        """Write atomically (temp file + rename): a reader never sees half a manifest."""
        path = Path(directory) / MANIFEST_NAME
        write_atomically(path, lambda partial: partial.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"))
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        """Parse and check format, version and the manifest's own hash (not the files: see :meth:`verify_files`)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"artifact directory not found: {directory}")
        path = directory / MANIFEST_NAME
        if path.is_symlink():
            raise ArtifactError(f"{path} is a symbolic link; an artifact's manifest must be a file inside it")
        if not path.is_file():
            raise ArtifactError(f"{directory} has no {MANIFEST_NAME}; not a prumerge artifact (or an interrupted build)")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has format version {data.get('format_version')}; this prumerge reads version {FORMAT_VERSION}. "
                "Rebuild the artifact with this version of prumerge-export."
            )
        recorded = data.pop("manifest_sha256", None)
        if recorded != _self_hash(data):
            raise ArtifactError(f"{path} was edited after the build (its manifest_sha256 no longer matches); rebuild it")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"{path} has unknown field(s) {', '.join(unknown)}")
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ArtifactError(f"{path} lacks required fields: {exc}") from exc
        manifest.recorded_sha256 = recorded
        return manifest

    @property
    def sha256(self) -> str:
        """The manifest's own hash (what ``--expect-sha256`` pins)."""
        return getattr(self, "recorded_sha256", None) or _self_hash(dataclasses.asdict(self))

    def referenced_files(self) -> list:
        """Every file the runtime opens, as manifest-relative names (each must be listed in ``files``)."""
        names = []
        for graph in (self.vision, self.baseline):
            if graph:
                names.append(graph.file)
                names += [n for n in self.files if n.startswith(graph.file + ".") and n.endswith(".data")]
                if graph.engine:
                    names.append(graph.engine.file)
        if self.llm and self.llm.decoder:
            base = self.llm.directory
            names += [f"{base}/{name}" for name in (self.llm.decoder, self.llm.embeddings, self.llm.tokenizer)]
            names += [n for n in self.files if n.startswith(base + "/")]
        return sorted(set(names))

    def verify_files(self, directory: str | os.PathLike, expect_sha256: str | None = None) -> None:
        """Every recorded file exists with its recorded size and sha256, every path stays inside ``directory``,
        every file the runtime opens is recorded; with ``expect_sha256``, the manifest is the one pinned."""
        directory = Path(directory)
        if expect_sha256 is not None and expect_sha256.strip().lower() != self.sha256:
            raise ArtifactError(f"{directory}: the manifest's sha256 is {self.sha256}, not the pinned {expect_sha256.strip()}; "
                                "this is not the artifact you expected")
        for name in self.files:
            inside(directory, name)
        unlisted = [n for n in self.referenced_files() if n not in self.files]
        if unlisted:
            raise ArtifactError(f"{directory}: the manifest names files it does not hash: {', '.join(unlisted)}")
        if not self.files:
            raise ArtifactError(f"{directory}: the manifest lists no files; not a complete artifact")
        for name, meta in sorted(self.files.items()):
            path = inside(directory, name)
            if not path.is_file():
                raise ArtifactError(f"artifact file missing: {path}")
            if path.stat().st_size != meta["bytes"]:
                raise ArtifactError(f"artifact file {path} has {path.stat().st_size} bytes, the build wrote {meta['bytes']}; it was modified or truncated")
            if sha256_file(path) != meta["sha256"]:
                raise ArtifactError(f"artifact file {path} does not match its sha256 in the manifest; it was modified")
        self._check_external_data(directory)

    def _check_external_data(self, directory: Path) -> None:
        """Every file a listed ONNX graph makes onnxruntime read (its external data) is itself listed and hashed:
        a graph pointing at an unlisted or outside file is refused, so the pinned hash covers all that runs."""
        from .onnx_files import external_data_locations

        for name in sorted(n for n in self.files if n.endswith(".onnx")):
            for location in sorted(external_data_locations(inside(directory, name))):
                pure = PurePosixPath(location)
                target = posixpath.normpath(str(PurePosixPath(name).parent / pure)) if location else ""
                if not location or pure.is_absolute() or target.startswith("../") or target not in self.files:
                    raise ArtifactError(f"{directory}: graph {name} reads external data from {location!r}, which the "
                                        "manifest does not hash; refused")
                inside(directory, target)


def inside(directory: str | os.PathLike, name: str) -> Path:
    """``directory / name`` when ``name`` is a plain relative path that resolves inside ``directory``; else an
    ArtifactError (absolute paths, ``..``, links that leave the directory)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ArtifactError(f"the manifest names an invalid path {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise ArtifactError(f"the manifest names {name!r}, outside the artifact directory; refused")
    root = Path(directory).resolve()
    path = (root / pure).resolve()
    if path != root and root not in path.parents:
        raise ArtifactError(f"the manifest names {name!r}, which resolves outside the artifact directory; refused")
    return root / pure


def _self_hash(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_atomically(path: Path, write) -> None:
    """``write(partial)`` into ``.NAME.partial`` beside ``path``, then one rename over it: a reader (or a process
    killed mid-write) never sees half a file; the previous one stays whole until the new one is complete."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    os.replace(partial, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path) -> dict:
    """``{relative name: {sha256, bytes}}`` for every file under ``directory`` except the manifest."""
    out = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            out[str(path.relative_to(directory))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out
