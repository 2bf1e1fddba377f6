"""What ``build`` is asked to make, as typed stages: every option belongs to the stage that uses it, and every
combination is checked when the options are made, before any checkpoint is converted or model loaded.

Why typed stages and not one flat record: a flat record of 24 fields (two of them untyped dicts popped by hand)
let any stage read any option and let invalid combinations (INT8 without a calibration file, a token cap on the
unreduced method, an engine batch over the graph's) surface minutes into a build. Here a stage that is not asked
for is ``None`` (``llm=None``: vision only; ``engine=None``: no TensorRT script; ``int8=None``: float graph), and
the command line maps its flags onto these types in one place (``prumerge.cli``).
"""

from __future__ import annotations

import dataclasses

from ..artifact.contract import CONTRACTS, PLAIN_OPSET
from ..errors import ConfigError
from ..reduce.config import Method, ReducerConfig

LLM_PROVIDERS = ("cpu", "cuda")
KV_CACHES = ("auto", "float", "int8", "mixed")
LLM_PRECISIONS = ("int4", "int8", "fp16", "fp32")  # what onnxruntime-genai's builder writes (export.llm)


def _count(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Where the checkpoint's parts come from, beyond the model path itself."""

    revision: str | None = None  # hub revision (branch, tag or commit)
    base: str | None = None  # original-layout LoRA checkpoints: the base LLM (local dir or hub id)
    vision_tower: str | None = None  # original-layout checkpoints: the CLIP tower, instead of config's mm_vision_tower
    # a full CLIP checkpoint (dir or hub id) whose text side embeds the question for cdpruner (the released relevance)
    text_encoder: str | None = None


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    """The exported vision graph(s): contract, opset, precision, batch limit, input size, checks."""

    contract: str = "padded"  # padded: static [B, K, D] (TensorRT 10.3); dynamic: token axis trimmed
    opset: int = PLAIN_OPSET  # 23 and later: attention as ONNX's fused Attention op (the constant says when)
    fp16: bool = False  # fp16 weights; the reducer still computes in fp32
    batch_max: int = 16
    validate_images: int = 4  # images onnxruntime is compared with PyTorch on
    project: bool = True  # apply the LLaVA projector (tokens LLM-ready)
    slim: bool = True  # onnxslim simplification (validated like any graph)
    image_size: int | None = None  # square input side; None: the checkpoint's processor crop, else its config
    baseline: bool = False  # also export the unreduced (method none) graph, for comparisons and profiling

    def __post_init__(self) -> None:
        if self.contract not in CONTRACTS:  # the contract's own list (export.graph.Contract is its enum)
            raise ConfigError(f"unknown output contract {self.contract!r}; choose {' or '.join(CONTRACTS)}")
        _count(self.batch_max, "batch_max", 1)
        _count(self.validate_images, "validate_images", 1)
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)):
            raise ConfigError(f"image_size must be an integer, got {self.image_size!r}")  # its range: the tower's patch size

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"




@dataclasses.dataclass(frozen=True)
class LlmOptions:
    """The language model's ONNX decoder (onnxruntime-genai's builder)."""

    precision: str = "auto"
    provider: str = "cpu"
    # float: the builder's cache; int8: calibrated per channel (prumerge.export.kv_cache), every step on the int8
    # kernel (decode after 2000 positions 1.5x faster than float, a 589-position prefill 0.7x as fast); mixed: the same
    # int8 cache, the first step's attention in float (export.kv_cache.float_prefill): float's prefill, int8's decode;
    # auto: mixed where the int8 cache applies (CPU provider, float32 inputs), else float
    kv_cache: str = "auto"

    def __post_init__(self) -> None:
        choices = ("auto", *LLM_PRECISIONS)  # auto: int4 for LLaVA checkpoints with a projector
        if self.precision not in choices:
            raise ConfigError(f"unknown LLM precision {self.precision!r}; choose one of: {', '.join(choices)}")
        if self.provider not in LLM_PROVIDERS:
            raise ConfigError(f"unknown LLM provider {self.provider!r}; choose one of: {', '.join(LLM_PROVIDERS)}")
        if self.kv_cache not in KV_CACHES:
            raise ConfigError(f"unknown KV cache {self.kv_cache!r}; choose one of: {', '.join(KV_CACHES)}")
        if self.kv_cache in ("int8", "mixed") and not self._int8_cache_applies(self.precision):
            raise ConfigError(f"--llm-kv-cache {self.kv_cache} is for decoders with float32 inputs on the CPU provider "
                              "(where it was measured); use float with --llm-provider cuda or --llm-precision fp16")

    def _int8_cache_applies(self, precision: str | None) -> bool:
        return self.provider == "cpu" and precision != "fp16"

    def kv_cache_for(self, precision: str | None) -> str:
        """The cache to build for the decoder precision chosen (``auto`` resolved: mixed where it applies)."""
        if self.kv_cache != "auto":
            return self.kv_cache
        return "mixed" if self._int8_cache_applies(precision) else "float"


@dataclasses.dataclass(frozen=True)
class Int8Options:
    """Quantising the vision graph (needs the build's calibration file for its images)."""

    method: str = "minmax"
    float_layers: int = 0  # also keep the tower's last K encoder layers float (selection stays closer)
    # keep float the fewest tower parts (by measured harm) that reach this mean Jaccard with fp32's selection
    target_jaccard: float | None = None

    def __post_init__(self) -> None:
        from ..calib.int8 import CALIBRATION_METHODS

        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}; choose one of: {', '.join(CALIBRATION_METHODS)}")
        _count(self.float_layers, "int8 float_layers", 0)
        if self.target_jaccard is not None:
            if isinstance(self.target_jaccard, bool) or not isinstance(self.target_jaccard, (int, float)) \
                    or not 0 < self.target_jaccard <= 1:
                raise ConfigError(f"int8 target Jaccard must be a number in (0, 1], got {self.target_jaccard!r}")
            if self.float_layers:
                raise ConfigError("give --int8-float-layers or --int8-target-jaccard, not both (the target chooses "
                                  "which layers stay float)")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything ``prumerge-export build`` takes, with the command line's defaults.

    ``reducer.capacity`` is ``--max-tokens`` (None: from ``calibration`` when given, else enough for the method);
    ``engine`` (``prumerge.export.tensorrt.EngineOptions``) writes ``build_engine.sh`` for its target and, with
    ``engine.build``, builds ``vision.engine`` here."""

    reducer: ReducerConfig = ReducerConfig()
    graph: GraphOptions = GraphOptions()
    source: SourceOptions = SourceOptions()
    llm: LlmOptions | None = LlmOptions()
    engine: object | None = None  # EngineOptions (export.tensorrt imports nothing heavy, but keep this module flat)
    int8: Int8Options | None = None
    calibration: str | None = None  # calibration file from `calibrate`: capacity (and the INT8 image set)

    def __post_init__(self) -> None:
        from .graph import check_opset

        check_opset(self.graph.opset)
        if self.reducer.capacity is not None and self.reducer.method is Method.NONE:
            raise ConfigError("--max-tokens applies to prumerge / prumerge+, not to method none")
        if self.int8 is not None and not self.calibration:
            raise ConfigError("an INT8 vision graph needs --calibration FILE (from prumerge-export calibrate)")
        if self.int8 is not None and self.int8.method == "per-token" and self.engine is not None:
            from ..calib.int8 import PER_TOKEN_NOT_TENSORRT

            raise ConfigError(PER_TOKEN_NOT_TENSORRT)
        if self.engine is not None and self.graph.opset > PLAIN_OPSET:
            raise ConfigError(f"--opset {self.graph.opset} writes attention as ONNX's fused Attention op, which TensorRT "
                              "10.3's ONNX parser does not take: a TensorRT --target needs the default --opset "
                              f"{PLAIN_OPSET}")
        if self.reducer.spec.inputs:  # the graph reads the question: what the rest of the build can do with it yet
            if self.llm is None and self.source.text_encoder is None:
                raise ConfigError(f"--method {self.method.value} reads the question (embedded with the LLM's own "
                                  "table): --no-llm cannot be built with it (unless --text-encoder embeds it)")
        if self.source.text_encoder is not None:
            if not self.reducer.spec.inputs:
                raise ConfigError(f"--text-encoder embeds the question for a reducer that reads it (cdpruner), not "
                                  f"for --method {self.method.value}")
            if self.int8 is not None:
                raise ConfigError("--text-encoder with an INT8 vision graph is not built yet (CLIP's image head would "
                                  "be quantised, unmeasured): build it in fp32 or fp16")
        if self.engine is not None:
            from .tensorrt import EngineOptions, check_batch

            if not isinstance(self.engine, EngineOptions):
                raise ConfigError(f"engine options must be EngineOptions, got {type(self.engine).__name__}")
            check_batch(self.engine, self.graph.batch_max)

    @property
    def method(self) -> Method:
        return self.reducer.method

    def with_capacity(self, capacity: int | None) -> "BuildOptions":
        return dataclasses.replace(self, reducer=self.reducer.replace(capacity=capacity))


def from_flags(kwargs: dict, base: str | None = None, vision_tower: str | None = None,
               text_encoder: str | None = None, defaulted: frozenset = frozenset()) -> "BuildOptions":
    """The one place the command line's flags (click's parameter names: ``build`` and ``demo`` share them) become
    the build's typed stages. A flag its stage would ignore is refused in one line, not silently dropped.
    ``defaulted``: the flags the user left at their default (one default depends on another flag: CDPruner's
    relevance sign is the released ``negated`` when the question is CLIP text, ``--text-encoder``)."""
    from ..reduce import registry
    from .tensorrt import EngineOptions, engine_overrides

    kwargs = dict(kwargs)
    reducer = {name: kwargs.pop(name) for name in registry.options()}
    if text_encoder and "relevance_sign" in defaulted:
        reducer["relevance_sign"] = "negated"
    method = kwargs.pop("method")
    if method == "none":
        reducer = {}
    no_llm, llm_precision, llm_provider = kwargs.pop("no_llm"), kwargs.pop("llm_precision"), kwargs.pop("llm_provider")
    llm_kv_cache = kwargs.pop("llm_kv_cache")
    overrides = engine_overrides(kwargs)
    target, build_engine = kwargs.pop("target"), kwargs.pop("engine")
    engine = None
    if target or build_engine:
        engine = EngineOptions.for_target(target or "server", build_here=build_engine, **overrides)
    calibration = kwargs.pop("calibration")
    int8_method, float_layers = kwargs.pop("calibration_method"), kwargs.pop("int8_float_layers")
    target_jaccard = kwargs.pop("int8_target_jaccard")
    # a flag that its stage would ignore is refused, not silently dropped (an fp32 build "with" a Jaccard target)
    unused = [flag for flag, given in (("--calibration-method", int8_method != "minmax"),
                                       ("--int8-float-layers", bool(float_layers)),
                                       ("--int8-target-jaccard", target_jaccard is not None))
              if given and overrides.get("precision") != "int8"]
    if unused:
        raise ConfigError(f"{', '.join(unused)} apply to an INT8 vision graph only: add --precision int8 "
                          "--calibration FILE, or leave them out")
    unused = [flag for flag, given in (("--llm-precision", llm_precision is not None),
                                       ("--llm-kv-cache", llm_kv_cache != "auto"),
                                       ("--llm-provider", llm_provider != "cpu")) if given and no_llm]
    if unused:
        raise ConfigError(f"{', '.join(unused)} apply to the language model, and --no-llm builds none")
    return BuildOptions(
        reducer=ReducerConfig(method=method, capacity=kwargs.pop("max_tokens"), **reducer),
        graph=GraphOptions(contract=kwargs.pop("output"), opset=kwargs.pop("opset"), fp16=kwargs.pop("fp16"),
                           batch_max=kwargs.pop("batch_max"), project=not kwargs.pop("no_project", False),
                           slim=not kwargs.pop("no_slim"), image_size=kwargs.pop("image_size"),
                           baseline=kwargs.pop("baseline")),
        source=SourceOptions(revision=kwargs.pop("revision", None), base=base, vision_tower=vision_tower,
                             text_encoder=text_encoder),
        llm=None if no_llm else LlmOptions(precision=llm_precision or "auto", provider=llm_provider,
                                           kv_cache=llm_kv_cache),
        engine=engine,
        int8=Int8Options(method=int8_method, float_layers=float_layers, target_jaccard=target_jaccard)
        if overrides.get("precision") == "int8" else None,
        calibration=str(calibration) if calibration else None,
    )
