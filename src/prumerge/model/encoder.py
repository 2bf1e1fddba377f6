"""``PruMergeEncoder``: a Hugging Face vision tower (CLIP, DINOv2, SigLIP; + LLaVA projector) with the reducer
inside its graph.

The tower is run layer by layer up to what is needed: LLaVA reads the penultimate layer's output, and PruMerge
needs only the last layer's q/k, which are that same tensor through the last layer's pre-attention norm and
``q_proj``/``k_proj``. So for CLIP-LLaVA the last layer's attention and MLP are never computed, and no forward
hook (global, stateful, not exportable) is needed. What differs per family lives in :mod:`prumerge.model.towers`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, is_projector_key, is_vision_key, projector_state, vision_state
from ..artifact.contract import PATCH_OUTPUTS
from ..errors import CheckpointError, ConfigError, InputError
from ..reduce.config import Method, ReducerConfig
from ..reduce.reducer import ReducedTokens, check_inputs, reduce_tokens
from .towers import FAMILIES, build_tower, match_key_layout, tower_for


class PruMergeEncoder(nn.Module):
    """``pixel_values [B, 3, H, W]`` -> :class:`ReducedTokens` (tokens optionally projected to the LLM width).

    ``method="none"`` returns the plain LLaVA features (every patch, or CLS + patches for the ``full`` feature
    strategy) in the same contract, as the unreduced baseline.
    """

    def __init__(
        self,
        tower: nn.Module,
        reducer: ReducerConfig,
        projector: nn.Module | None = None,
        feature_layer: int | None = None,
        keep_cls: bool = False,
        source: dict | None = None,
    ) -> None:
        super().__init__()
        self.tower = tower
        self.adapter = tower_for(tower)
        self.reducer = reducer
        self.projector = projector
        self.keep_cls = keep_cls and self.adapter.prefix_tokens > 0
        self.source = source or {}
        self.image_head: nn.Module | None = None  # CLIP's image head (model.text_relevance): build --text-encoder
        config = tower.config
        if feature_layer is None:
            feature_layer = self.adapter.default_feature_layer
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.num_patches = self.grid * self.grid
        if not -(self.num_layers + 1) <= feature_layer <= self.num_layers:
            raise ConfigError(f"feature layer {feature_layer} is outside the tower's {self.num_layers + 1} hidden states")
        self.feature_index = feature_layer % (self.num_layers + 1)  # index into HF hidden_states
        # the layer whose q/k score patches: PruMerge reads the last layer's; VisionZip the layer that outputs the
        # features (LLaVA-1.5: layers[-2], as its official code); DivPrune reads none
        self.scoring_layer = self.num_layers - 1
        if reducer.spec.scoring_layer == "feature":
            if self.feature_index == 0:
                raise ConfigError(f"{reducer.method.value} scores with the attention of the layer that outputs the "
                                  "features; the feature layer here is the embeddings, which have none")
            self.scoring_layer = self.feature_index - 1
        if reducer.spec.inputs and reducer.spec.projected and projector is None:
            raise ConfigError(f"{reducer.method.value} compares the projected tokens with the question in the LLM's "
                              "embedding space: it needs the checkpoint's projector (a LLaVA checkpoint, without "
                              "--no-project)")
        if reducer.method is Method.NONE:
            self.capacity = self.num_patches + (1 if self.keep_cls else 0)
        else:
            self.capacity = reducer.resolved_capacity(self.num_patches)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        method: str | Method = "prumerge",
        project: bool = True,
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        image_size: int | None = None,
        **reducer_options: Any,
    ) -> "PruMergeEncoder":
        """Load the vision side of a CLIP vision, CLIP or LLaVA (llava-hf layout) checkpoint.

        ``project=True`` applies the LLaVA projector when the checkpoint has one (tokens come out LLM-ready).
        ``image_size``: the square side the encoder takes; default the checkpoint's processor crop (what the model
        is used at) when it has a processor config, else the config's ``image_size``. Position embeddings are
        interpolated to it once, here (see :meth:`prumerge.model.towers.Tower.resize`).
        Extra keyword arguments are :class:`ReducerConfig` fields (``attention``, ``order``, ``capacity``, ...).
        """
        from transformers import AutoConfig

        from ..artifact.preprocess_config import processor_image_size

        reducer = ReducerConfig(method=Method.parse(method), **reducer_options)
        checkpoint = Checkpoint.open(path_or_id, revision=revision)
        try:
            config = AutoConfig.from_pretrained(str(checkpoint.config_dir()))
        except Exception as exc:
            raise CheckpointError(f"{checkpoint.source}: cannot parse config.json ({exc})") from exc

        model_type = config.model_type
        feature_layer, keep_cls, projector_config, tower = None, False, None, None
        if model_type == "llava":
            vision_config = config.vision_config
            feature_layer = config.vision_feature_layer
            if not isinstance(feature_layer, int):
                raise CheckpointError(f"{checkpoint.source}: multi-layer vision features {feature_layer} are not supported")
            keep_cls = config.vision_feature_select_strategy == "full"
            projector_config = config if project else None
            wanted = lambda key: is_vision_key(key) or (project and is_projector_key(key))  # noqa: E731
        elif model_type in ("clip", "siglip"):
            vision_config = config.vision_config
            wanted = lambda key: key.startswith("vision_model.")  # noqa: E731
        elif model_type == "clip_vision_model":
            vision_config = config
            wanted = lambda key: True  # noqa: E731
        elif model_type in FAMILIES:
            # other tower families load through transformers, which also renames their older key layouts
            vision_config = config
            tower = _load_family(model_type, checkpoint, revision)
        else:
            supported = ", ".join(sorted({"llava", "clip", "siglip", *FAMILIES}))
            raise CheckpointError(f"{checkpoint.source}: model type {model_type!r} is not supported (expected one of: {supported})")
        if vision_config.model_type not in FAMILIES:
            raise CheckpointError(f"{checkpoint.source}: vision tower {vision_config.model_type!r} is not supported yet")

        state = {}
        if tower is None:
            state = checkpoint.read_tensors(wanted)
            tower = _load_tower(vision_config, vision_state(state, has_prefix=model_type == "llava"), checkpoint.source)
        processor = checkpoint.processor()  # preprocessor_config.json as found (None when absent)
        if image_size is None:
            try:
                image_size = processor_image_size(processor)
            except InputError as exc:
                raise CheckpointError(f"{checkpoint.source}: preprocessor_config.json: {exc}") from exc
        tower_for(tower).resize(int(image_size if image_size is not None else tower.config.image_size))
        projector = None
        if projector_config is not None:
            projector = _load_projector(projector_config, projector_state(state), checkpoint.source)
        source = {"model": checkpoint.source, "revision": revision, "fingerprint": checkpoint.fingerprint(), "model_type": model_type}
        encoder = cls(tower, reducer, projector=projector, feature_layer=feature_layer, keep_cls=keep_cls, source=source)
        encoder.checkpoint_config = config  # the whole HF config (LLM side included), for the artifact manifest
        encoder.processor = processor
        return encoder.to(dtype).eval()

    # ------------------------------------------------------------------ what callers share
    processor: dict | None = None

    def preprocess_config(self):
        """The one place a checkpoint's preprocessing is derived: its processor config at this encoder's size."""
        from ..artifact.preprocess_config import PreprocessConfig

        try:
            return PreprocessConfig.from_processor_dict(self.processor, self.image_size)
        except InputError as exc:
            raise CheckpointError(f"{self.source.get('model')}: preprocessor_config.json: {exc}") from exc

    def reducer_section(self):
        """The manifest's reducer section, written by the encoder that holds its facts (every option of every
        registered method, the grid, the feature layer, the contract's sentinel indices), checked as a reader would."""
        from ..artifact.contract import CLS_TOKEN_INDEX, CONTEXTUAL_TOKEN_INDEX, EXTRA_TOKEN_INDEX, PADDING_INDEX
        from ..artifact.sections import ReducerSection

        return ReducerSection.from_dict({
            "options": {k: v for k, v in self.reducer.to_dict().items() if k not in ("method", "capacity")},
            "num_patches": self.num_patches, "grid": self.grid, "image_size": self.image_size,
            "patch_size": self.patch_size, "feature_layer": self.feature_index - (self.num_layers + 1),
            "extra_token_index": EXTRA_TOKEN_INDEX, "padding_index": PADDING_INDEX, "cls_token_index": CLS_TOKEN_INDEX,
            "contextual_token_index": CONTEXTUAL_TOKEN_INDEX}, "reducer")

    def reduce(self, hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, reducer: ReducerConfig | None = None) -> ReducedTokens:
        """The reducer on :meth:`tower_outputs` with this tower's prefix and importance (every caller, one scoring)."""
        prefix = self.adapter.prefix_tokens
        return reduce_tokens(hidden[:, prefix:], q, k, reducer or self.reducer, num_heads=self.num_heads, prefix=prefix,
                             importance=self.adapter.importance)

    def selection_scores(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [B, P], thresholds [B])`` from :meth:`tower_outputs`' ``q, k``: the patch importance and IQR
        outlier threshold selection is made from (fp32, as the reducer computes them). Validation of
        reduced-precision graphs checks a moved selection against these."""
        from ..reduce.attention import importance_scores
        from ..reduce.outliers import iqr_threshold

        scores = importance_scores(q.float(), k.float(), self.reducer, self.num_heads, self.adapter.prefix_tokens,
                                   self.adapter.importance)
        return scores, iqr_threshold(scores, self.reducer.iqr_factor)

    def neighbor_gaps(self, pixel_values: torch.Tensor | None, indices: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """For each output slot, the reference's similarity gap at its neighbour boundary, ``[B, C]`` float64.

        Slot ``i`` holding patch ``p`` merges ``p``'s ``n`` most key-cosine-similar other patches; the gap is the
        n-th minus the (n+1)-th similarity. When it is below the float error between two runtimes, either may
        take the other patch: validation uses this to tell such near-ties from real disagreements. Slots that are
        not merged tokens (extra token, padding) get +inf (no boundary).
        """
        from ..reduce.merge import neighbor_gaps

        if keys is None:
            with torch.no_grad():
                _, _, keys = self.tower_outputs(pixel_values)
        prefix = self.adapter.prefix_tokens
        return neighbor_gaps(keys[:, prefix:].double(), indices, self.reducer.neighbors)

    # ------------------------------------------------------------------ the question's side
    def relevance_inputs(self, patches: torch.Tensor) -> dict:
        """What a question-reading reducer compares the question with besides the tokens it chooses among:
        CLIP image embeddings of the feature layer's ``patches`` when the artifact has a CLIP text side."""
        return {} if self.image_head is None else {"image_embeds": self.image_head(patches)}

    @property
    def question_width(self) -> int:
        """The width of the question's rows the graph takes: CLIP's text embeddings, else the LLM's input
        embeddings (the projected tokens' width)."""
        return self.image_head.width if self.image_head is not None else self.output_width

    # ------------------------------------------------------------------ forward
    @property
    def output_width(self) -> int:
        if self.projector is not None:
            return self.projector.linear_2.out_features
        return self.tower.config.hidden_size

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if not isinstance(pixel_values, torch.Tensor):
            raise InputError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise InputError(f"pixel_values must be [batch, {', '.join(map(str, expected))}], got {tuple(pixel_values.shape)}")

    def tower_outputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(hidden [B, prefix+P, D], q, k)``: the feature layer's output and the scoring layer's q/k (the last
        layer's for PruMerge, the feature layer's own for VisionZip).

        Only ``max(feature_index, scoring_layer)`` layers run (the scoring layer's input is all q/k need).
        """
        adapter = self.adapter
        states = [adapter.embed(pixel_values.to(adapter.patch_embedding.weight.dtype))]
        for layer in adapter.layers[: max(self.feature_index, self.scoring_layer)]:
            states.append(adapter.run_layer(layer, states[-1]))
        query_rows = 1 if adapter.importance == "cls_attention" else None  # CLS attention reads the CLS query alone
        q, k = adapter.qk(adapter.layers[self.scoring_layer], states[self.scoring_layer], query_rows)
        return adapter.finish(states[self.feature_index], self.feature_index), q, k

    def patch_output_names(self) -> tuple:
        """The extra outputs of a question-reading graph (``artifact.contract.PATCH_OUTPUTS``): what its reducer
        chooses among, for the reducer graph to run on again with another question."""
        if not self.reducer.spec.inputs:
            return ()
        return PATCH_OUTPUTS if self.image_head is not None else PATCH_OUTPUTS[:1]

    def forward(self, pixel_values: torch.Tensor, tower_sink: list | None = None, patch_sink: list | None = None,
                **inputs) -> ReducedTokens:
        """``tower_sink``: a list that receives the last layer's ``(q, k)`` (validation reuses them for neighbour
        gaps and selection scores instead of a second tower pass). ``patch_sink``: a list that receives what a
        question-reading reducer chose among (:meth:`patch_output_names`). ``inputs``: what the method reads
        besides the pixels (its spec's ``inputs``: CDPruner's question)."""
        self.check_pixels(pixel_values)
        missing = [name for name in self.reducer.spec.inputs if inputs.get(name) is None]
        if missing:
            raise InputError(f"{self.reducer.method.value} reads {', '.join(missing)} besides the pixels: give them")
        hidden, q, k = self.tower_outputs(pixel_values)
        if tower_sink is not None:
            tower_sink.append((q, k))
        batch, prefix = hidden.shape[0], self.adapter.prefix_tokens
        spec = self.reducer.spec
        if not spec.adaptive:  # adaptive reducers check their own inputs
            check_inputs(hidden[:, prefix:], q, k, prefix)
        if spec.run is None:  # none: the features themselves
            features = torch.cat([hidden[:, :1], hidden[:, prefix:]], dim=1) if self.keep_cls else hidden[:, prefix:]
            count = features.shape[1]
            out = ReducedTokens(
                features,
                torch.full((batch,), count, dtype=torch.int64, device=features.device),
                torch.arange(count, device=features.device).expand(batch, count) - (1 if self.keep_cls else 0),
                torch.zeros(batch, dtype=torch.bool, device=features.device),
            )
        elif spec.projected:  # chooses among the tokens the LLM receives: projected first
            features = hidden[:, prefix:] if self.projector is None else self.projector(hidden[:, prefix:])
            relevance = self.relevance_inputs(hidden[:, prefix:])
            if patch_sink is not None:
                patch_sink.extend([features, *relevance.values()])  # PATCH_OUTPUTS' order
            return _fixed(*spec.run(self, features, q, k, **inputs, **relevance))
        else:
            out = spec.run(self, hidden, q, k)
            if not spec.adaptive:
                out = _fixed(*out)
        if self.projector is None:
            return out
        projected = self.projector(out.tokens)
        valid = torch.arange(projected.shape[1], device=projected.device).unsqueeze(0) < out.num_tokens.unsqueeze(-1)
        projected = torch.where(valid.unsqueeze(-1), projected, torch.zeros_like(projected))  # padding stays zero
        return ReducedTokens(projected, out.num_tokens, out.indices, out.truncated)


def _fixed(tokens: torch.Tensor, indices: torch.Tensor) -> ReducedTokens:
    """A fixed-count method's output in the contract: every slot a token, none truncated."""
    batch, count = indices.shape
    return ReducedTokens(tokens, torch.full((batch,), count, dtype=torch.int64, device=tokens.device), indices,
                         torch.zeros(batch, dtype=torch.bool, device=tokens.device))


def _load_family(model_type: str, checkpoint, revision) -> nn.Module:
    from transformers import AutoModel

    location = str(checkpoint.root) if checkpoint.root is not None else checkpoint.source
    try:
        return AutoModel.from_pretrained(location, revision=revision).float()
    except Exception as exc:
        raise CheckpointError(f"{checkpoint.source}: cannot load the {model_type} tower ({exc})") from exc


def _load_tower(vision_config, state: dict, source: str) -> nn.Module:
    tower = build_tower(vision_config)
    state = match_key_layout(tower, state)
    needed = {k for k in tower.state_dict() if not k.startswith("post_layernorm.")}
    missing = sorted(needed - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: vision tower weights missing from the checkpoint: {shown}")
    _check_shapes(tower, state, source, "vision tower")
    tower.load_state_dict(state, strict=False)
    return tower


def _check_shapes(module: nn.Module, state: dict, source: str, what: str) -> None:
    """One line naming the tensor and both shapes (not torch's multi-line size-mismatch traceback)."""
    for name, expected in module.state_dict().items():
        got = state.get(name)
        if got is not None and tuple(got.shape) != tuple(expected.shape):
            raise CheckpointError(f"{source}: {what} tensor {name} has shape {list(got.shape)} but the config makes it "
                                  f"{list(expected.shape)}; the weights and config.json do not match")


def _load_projector(config, state: dict, source: str) -> nn.Module:
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    projector = LlavaMultiModalProjector(config)
    expected = set(projector.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{source}: projector weights missing from the checkpoint: {', '.join(missing)}")
    _check_shapes(projector, state, source, "projector")
    projector.load_state_dict({k: state[k] for k in expected})
    return projector
