"""CDPruner's released relevance for CLIP towers: the instruction embedded by CLIP's text model, compared with the
tower's patches embedded by CLIP's image head (``post_layernorm`` then ``visual_projection``).

A LLaVA checkpoint carries only CLIP's vision tower, so this side comes from a full CLIP checkpoint
(``build --text-encoder``): its text model (exported as the artifact's text graph, run on the device with the
checkpoint's own ``tokenizer.json`` through ``tokenizers``) and its image head (inside the vision graph, on the
feature layer's patches, as the released ``clip_encoder.py`` computes ``image_embeds``). The image head is only
meaningful on the tower it was trained with, so the CLIP's vision weights must be the LLaVA tower's own (LLaVA keeps
its CLIP frozen): a different CLIP is refused in one line, not turned into a silent, meaningless relevance.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

TEXT_DIR = "text"
TEXT_GRAPH = "text.onnx"
TEXT_TOKENIZER = "tokenizer.json"


class ImageHead(nn.Module):
    """``patches [B, P, D]`` (the feature layer's, no CLS) -> CLIP image embeddings ``[B, P, E]``."""

    def __init__(self, post_layernorm: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.post_layernorm = post_layernorm
        self.visual_projection = visual_projection

    @property
    def width(self) -> int:
        return self.visual_projection.out_features

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """In float32 whatever the graph's precision (the released code also projects ``.float()``)."""
        projection = self.visual_projection
        bias = None if projection.bias is None else projection.bias.float()
        return nn.functional.linear(self.post_layernorm(patches).float(), projection.weight.float(), bias)


class TextTower(nn.Module):
    """``(input_ids [S, L], attention_mask [S, L])`` -> ``text_embeds [S, E]``: CLIP's text model and projection
    (``CLIPTextModelWithProjection``), one embedding per segment of ``L`` tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds


def load_text_side(source: str, tower: nn.Module, revision: str | None = None) -> tuple[ImageHead, TextTower, Path]:
    """(the image head, the text tower, the checkpoint's ``tokenizer.json``) of the full CLIP at ``source`` (a local
    directory or hub id), checked against the LLaVA ``tower`` it will read."""
    from transformers import CLIPModel

    from .checkpoint import Checkpoint

    checkpoint = Checkpoint.open(source, revision=revision)
    location = str(checkpoint.root) if checkpoint.root is not None else source
    kind = checkpoint.config().get("model_type")
    if kind != "clip":
        raise CheckpointError(f"--text-encoder {source}: not a full CLIP checkpoint (vision + text): its config is "
                              f"{kind!r}, not 'clip'")
    try:
        clip, info = CLIPModel.from_pretrained(location, revision=revision, output_loading_info=True)
    except Exception as exc:
        raise CheckpointError(f"--text-encoder {source}: not a full CLIP checkpoint (vision + text): "
                              f"{str(exc).splitlines()[0]}") from exc
    if info.get("missing_keys"):  # transformers initialises missing weights at random: a meaningless relevance
        missing = sorted(info["missing_keys"])
        raise CheckpointError(f"--text-encoder {source}: {len(missing)} CLIP weights missing from the checkpoint, "
                              f"e.g. {missing[0]}")
    clip = clip.float().eval()
    tokenizer = checkpoint.file(TEXT_TOKENIZER, required=False)
    if tokenizer is None or not Path(tokenizer).is_file():
        raise CheckpointError(f"--text-encoder {source} has no {TEXT_TOKENIZER} (the device side tokenizes with it)")
    ours = {k: v for k, v in tower.state_dict().items() if not k.startswith("post_layernorm.")}
    theirs = clip.vision_model.state_dict()
    differing = [k for k, v in ours.items() if k not in theirs or theirs[k].shape != v.shape
                 or not torch.equal(theirs[k].float(), v.float())]
    if differing:
        raise CheckpointError(f"--text-encoder {source}: its vision weights are not this checkpoint's tower "
                              f"({len(differing)} of {len(ours)} tensors differ, e.g. {differing[0]}); CLIP's image "
                              "head only means something on the tower it was trained with: give the CLIP the LLaVA "
                              "tower was taken from")
    from transformers import CLIPTextModelWithProjection

    text_config = clip.config.text_config
    text_config.projection_dim = clip.config.projection_dim  # the projection the checkpoint has
    text = CLIPTextModelWithProjection(text_config).eval()
    text.text_model.load_state_dict(clip.text_model.state_dict())
    text.text_projection.load_state_dict(clip.text_projection.state_dict())
    return ImageHead(clip.vision_model.post_layernorm, clip.visual_projection), TextTower(text), tokenizer
