"""Vision tower families behind one small interface: what the reducer needs from a tower.

For each family: how to embed pixels, how to run one layer, where a layer's pre-attention q/k come from, how many
prefix tokens precede the patches (CLS, registers), and how a patch's importance is read:

* CLIP (default; the official PruMerge): CLS attention from the last layer's q/k.
* DINOv2: CLS attention likewise; register tokens (DINOv2-with-registers) are excluded from the patches.
* SigLIP: there is no CLS. Importance = attention *received* by each patch, averaged over all queries and heads
  of the chosen layer, the choice published PruMerge+ ports for SigLIP make. This is a deviation from the paper.

Families are a registry keyed by the transformers ``model_type``; each is one class, a small subclass overriding
only what differs from CLIP: its transformers model class, where its layers live (which also names them in the
exported graph's scopes, what INT8 and profiling read), its key layouts, how it embeds, runs and scores. A new family
is one class added to ``FAMILIES``.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

# the largest patch grid a graph is exported for: the reducer's similarity is P x P per image (4096 patches =
# 64 MB in fp32); ViT-L/14-336 has 576, DINOv2 at its 518 px config 1369
MAX_PATCHES = 4096


@functools.cache
def _takes_attention_mask(layer_type: type) -> bool:
    """Whether a layer's forward names ``attention_mask``: CLIP/SigLIP layers require it in every transformers 5.x,
    DINOv2's gained it in later 5.x releases (5.17 has none, so passing it there is a TypeError)."""
    return "attention_mask" in inspect.signature(layer_type.forward).parameters


class Tower:
    """CLIP (``CLIPVisionModel``, transformers 5.x layout)."""

    family = "clip"
    model_classes = {"clip_vision_model": "CLIPVisionModel"}  # model_type -> transformers class, by name
    layer_path = "encoder.layers"  # the module list of encoder layers (the exported graph's scopes say the same)
    # (released name, module name) pairs of weight keys a checkpoint may hold in either layout (match_key_layout)
    key_layouts: tuple = ()
    importance = "cls_attention"
    default_feature_layer = -2  # LLaVA reads the penultimate layer

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -------------------------------------------------------------- structure
    @property
    def layers(self):
        return functools.reduce(getattr, self.layer_path.split("."), self.model)

    @property
    def prefix_tokens(self) -> int:
        return 1

    @property
    def patch_embedding(self) -> nn.Module:
        return self.model.embeddings.patch_embedding

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.pre_layrnorm(self.model.embeddings(pixel_values))

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, attention_mask=None) if _takes_attention_mask(type(layer)) else layer(hidden)
        return out[0] if isinstance(out, tuple) else out

    def qk(self, layer: nn.Module, hidden: torch.Tensor, query_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's q/k projections of its input (bias included, before any scaling). ``query_rows``: only the
        first rows' queries (CLS attention reads the CLS row alone; k is needed for every token)."""
        normed = layer.layer_norm1(hidden)
        attention = layer.self_attn
        return attention.q_proj(normed[:, :query_rows] if query_rows else normed), attention.k_proj(normed)

    def finish(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """Features as the VLM reads them from hidden state ``index`` (post-norm for the last layer where the
        family's model applies one)."""
        return hidden

    # -------------------------------------------------------------- image size
    position_prefix = 1  # position-embedding rows before the patches' (CLS); registers have none

    def resize(self, image_size: int) -> None:
        """Take ``image_size`` px images from now on: position embeddings interpolated once, here.

        transformers interpolates on every call (``interpolate_pos_encoding``); doing it once at load with the
        family's own interpolation function (bicubic, ``align_corners=False``, the same corner alignment) gives
        the same numbers and keeps the exported graph static at that size.
        """
        config, patch = self.config, self.config.patch_size
        if image_size <= 0 or image_size % patch:
            raise CheckpointError(f"image size {image_size} is not a positive multiple of the patch size {patch}")
        if (image_size // patch) ** 2 > MAX_PATCHES:
            raise ConfigError(f"image size {image_size} gives {(image_size // patch) ** 2} patches of {patch} px; at most "
                              f"{MAX_PATCHES} are supported (the reducer compares every patch with every other)")
        if image_size == config.image_size:
            return
        embeddings = self.model.embeddings
        grid = image_size // patch
        dummy = torch.zeros(1, self.position_prefix + grid * grid, config.hidden_size)
        with torch.no_grad():
            table = embeddings.interpolate_pos_encoding(dummy, image_size, image_size).detach().float()
        self._set_positions(embeddings, table)
        config.image_size = image_size

    def _set_positions(self, embeddings: nn.Module, table: torch.Tensor) -> None:
        rows, width = table.shape[1], table.shape[2]
        embeddings.position_embedding = nn.Embedding(rows, width)
        embeddings.position_embedding.weight.data.copy_(table[0])
        embeddings.position_ids = torch.arange(rows).expand((1, -1))
        embeddings.image_size = int(round((rows - self.position_prefix) ** 0.5)) * self.config.patch_size
        embeddings.num_patches = rows - self.position_prefix
        embeddings.num_positions = rows


class Dinov2Tower(Tower):
    family = "dinov2"
    model_classes = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
    layer_path = "encoder.layer"
    # the released names (and transformers' save_pretrained, which writes them back) and those of transformers'
    # refactored attention module (5.17+)
    key_layouts = ((".attention.attention.query.", ".attention.q_proj."), (".attention.attention.key.", ".attention.k_proj."),
                   (".attention.attention.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj."))
    default_feature_layer = -1

    @property
    def prefix_tokens(self) -> int:
        return 1 + int(getattr(self.config, "num_register_tokens", 0) or 0)

    @property
    def patch_embedding(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings.projection

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(pixel_values)

    def qk(self, layer, hidden, query_rows=None):
        normed = layer.norm1(hidden)
        attention = layer.attention
        if hasattr(attention, "q_proj"):
            q_proj, k_proj = attention.q_proj, attention.k_proj
        else:  # transformers releases before the attention refactor (5.17 among them): attention.attention.query/key
            q_proj, k_proj = attention.attention.query, attention.attention.key
        return q_proj(normed[:, :query_rows] if query_rows else normed), k_proj(normed)

    def _set_positions(self, embeddings, table):
        embeddings.position_embeddings = nn.Parameter(table)

    def finish(self, hidden, index):
        # Dinov2Model's outputs are layer-normed after the last layer; intermediate states are not
        return self.model.layernorm(hidden) if index == len(self.layers) else hidden


class SiglipTower(Tower):
    family = "siglip"
    model_classes = {"siglip_vision_model": "SiglipVisionModel"}
    importance = "received_attention"
    default_feature_layer = -1
    position_prefix = 0

    @property
    def prefix_tokens(self) -> int:
        return 0

    @property
    def patch_embedding(self) -> nn.Module:
        return self.model.embeddings.patch_embedding

    def embed(self, pixel_values):
        return self.model.embeddings(pixel_values)

    def finish(self, hidden, index):
        return self.model.post_layernorm(hidden) if index == len(self.layers) else hidden


FAMILIES = {t: cls for cls in (Tower, Dinov2Tower, SiglipTower) for t in cls.model_classes}


def tower_for(model: nn.Module) -> Tower:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise CheckpointError(f"vision tower {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type](model)


def build_tower(vision_config) -> nn.Module:
    """An empty transformers model of the config's family (weights are loaded afterwards)."""
    import transformers

    family = FAMILIES.get(vision_config.model_type)
    model_class = getattr(transformers, family.model_classes[vision_config.model_type], None) if family else None
    if model_class is None:
        supported = ", ".join(sorted(t for f in set(FAMILIES.values()) for t, name in f.model_classes.items()
                                     if hasattr(transformers, name)))
        raise CheckpointError(f"vision tower {vision_config.model_type!r} is not supported (supported: {supported})")
    return model_class(vision_config)


def layer_scope_pattern() -> str:
    """A regular expression whose group 1 is the encoder layer of an exported node's module scope, for every family
    (``encoder.layers.3`` for CLIP and SigLIP, ``encoder.layer.3`` for DINOv2): INT8's tower parts read it."""
    import re

    paths = sorted({cls.layer_path for cls in FAMILIES.values()}, key=len, reverse=True)
    return r"(?:" + "|".join(re.escape(p) for p in paths) + r")\.(\d+)"


def match_key_layout(tower: nn.Module, state: dict) -> dict:
    """``state`` with its keys in the layout ``tower``'s module uses (its family's ``key_layouts``). A LLaVA checkpoint
    with a DINOv2 tower saved by transformers holds the released names (``attention.attention.query``) while the
    module may name them ``attention.q_proj`` (or the reverse on older releases); AutoModel renames on load, a state
    dict read by hand needs the same."""
    layouts = FAMILIES[tower.config.model_type].key_layouts if tower.config.model_type in FAMILIES else ()
    if not layouts:
        return state
    expected = set(tower.state_dict())
    renamed = {}
    for key, value in state.items():
        for old, new in layouts:
            for a, b in ((old, new), (new, old)):
                if a in key and key not in expected and key.replace(a, b) in expected:
                    key = key.replace(a, b)
        renamed[key] = value
    return renamed
