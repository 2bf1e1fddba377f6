"""The manifest's sections: source, reducer, each graph (with its validation) and the language model. Each one a
dataclass read by attribute and range-checked once when the manifest is read (``prumerge.artifact.fields``).
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import ArtifactError
from .contract import CONTRACTS, INPUT_NAME, METHODS, QUESTION_INPUTS
from .fields import _DTYPES, DecoderIO, Section, _choice, _integer, _tensor_specs
from .graph_facts import EngineFacts, EngineTarget, Int8Record, _op_support
from .preprocess_config import PreprocessConfig


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
                + (f"; selection moved within the selection rule (fp16, or a greedy near-tie) on {self.selection_moved} image(s)" if self.selection_moved else ""))

    def summary(self) -> str:
        moved = ""
        if self.selection_moved or self.selection_unexplained:
            moved = (f"; selection moved on {self.selection_moved} image(s) within the selection rule "
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
    # a question-reading graph: the reducer alone (contract.REDUCER_GRAPH_FILE), run on this graph's patch outputs
    # (contract.PATCH_OUTPUTS) when the same image is asked another question
    reducer_graph: str | None = None

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
        _choice(self.contract, f"{where}.contract", CONTRACTS)
        if self.reducer_graph is not None and (not isinstance(self.reducer_graph, str) or not self.reducer_graph
                                               or len(self.inputs) < 2):
            raise ArtifactError(f"manifest field {where}.reducer_graph must name the reducer graph of a graph that "
                                "reads the question")
        _integer(self.batch_max, f"{where}.batch_max", 1, 4096)
        _integer(self.capacity, f"{where}.capacity", 1, 1 << 16)
        _integer(self.output_width, f"{where}.output_width", 1, 1 << 16)
        self.inputs = _tensor_specs(self.inputs, f"{where}.inputs")
        self.outputs = _tensor_specs(self.outputs, f"{where}.outputs")
        names = tuple(s.name for s in self.inputs)
        if names[0] != INPUT_NAME or names[1:] not in ((), QUESTION_INPUTS):
            raise ArtifactError(f"manifest field {where}.inputs must be {INPUT_NAME}, optionally followed by "
                                f"{', '.join(QUESTION_INPUTS)}; got {', '.join(names)}")
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
    # an int8 KV cache's record (prumerge.export.kv_cache): {dtype, scales, rotary_envelope, calibration}, and with a
    # float first step (a mixed cache) prefill_switch: the decoder's bool input that selects it; None: float
    kv_cache: dict | None = None

    @property
    def prefill_switch(self) -> str | None:
        """A mixed cache's decoder input that runs a first step's attention in float (export.kv_cache)."""
        return (self.kv_cache or {}).get("prefill_switch")

    @property
    def kv_cache_kind(self) -> str:
        """What ``build --llm-kv-cache`` made: float, int8, or mixed (int8 with a float first step)."""
        if self.kv_dtype != "int8":
            return "float"
        return "mixed" if self.prefill_switch else "int8"

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
        if self.prefill_switch is not None and (not isinstance(self.prefill_switch, str) or not self.prefill_switch):
            raise ArtifactError(f"manifest field {where}.kv_cache.prefill_switch must name the decoder's bool input")
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


@dataclasses.dataclass
class TextSection(Section):
    """CLIP's text side (``build --text-encoder``): the text graph embedding a question for a reducer that compares
    it with CLIP image embeddings (CDPruner's released relevance), its tokenizer, the segment length it was exported
    for and the embeddings' width (the vision graph's question input width)."""

    directory: str
    graph: str
    tokenizer: str
    positions: int
    width: int
    max_segments: int
    source: str | None = None
    validation: dict | None = None  # the text graph against PyTorch at build time

    def check(self, where: str) -> None:
        for name in ("directory", "graph", "tokenizer"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ArtifactError(f"manifest field {where}.{name} must be a path in the artifact")
        _integer(self.positions, f"{where}.positions", 1, 1 << 16)
        _integer(self.width, f"{where}.width", 1, 1 << 16)
        _integer(self.max_segments, f"{where}.max_segments", 1, 1 << 16)
