"""PruMergeEncoder loads saved checkpoints (CLIP vision, LLaVA, old key layouts, shards) and matches HF + reference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llava, tiny_vision_config
from prumerge import PruMergeEncoder
from prumerge.errors import CheckpointError, InputError
from prumerge.reduce import ReducerConfig, reduce_tokens
from reference import reference_prumerge


def hf_features_and_qk(tower, pixel_values, feature_layer=-2):
    """What the official code sees: hidden_states[feature_layer] and hooked q_proj/k_proj outputs of the last layer."""
    captured = {}
    last = tower.encoder.layers[-1].self_attn
    hooks = [
        last.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
        last.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
    ]
    try:
        out = tower(pixel_values, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out.hidden_states[feature_layer], captured["q"], captured["k"]


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_clip_encoder_matches_hooked_official_path(clip_dir, method):
    from transformers import CLIPVisionModel

    encoder = PruMergeEncoder.from_pretrained(clip_dir, method=method)
    hf = CLIPVisionModel.from_pretrained(clip_dir).eval()
    assert encoder.num_patches == 64 and encoder.projector is None
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        out = encoder(pixels)
        hidden, q, k = hf_features_and_qk(hf, pixels)
    for b in range(4):
        ref_tokens, ref_idx = reference_prumerge(hidden[b, 1:], q[b], k[b], plus=method == "prumerge+")
        n = int(out.num_tokens[b])
        assert out.indices[b, : n - 1].tolist() == ref_idx
        torch.testing.assert_close(out.tokens[b, :n], ref_tokens, rtol=1e-5, atol=1e-5)


def test_llava_encoder_projects_and_none_matches_get_image_features(llava_dir):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        baseline = PruMergeEncoder.from_pretrained(llava_dir, method="none")(pixels)
        expected = hf.get_image_features(pixel_values=pixels).pooler_output
        expected = torch.stack(list(expected)) if isinstance(expected, (list, tuple)) else expected
        assert baseline.tokens.shape == (2, 64, 64) and baseline.num_tokens.tolist() == [64, 64]
        assert baseline.indices[0].tolist() == list(range(64))
        torch.testing.assert_close(baseline.tokens, expected.reshape(2, 64, 64), rtol=1e-5, atol=1e-5)

        reduced = PruMergeEncoder.from_pretrained(llava_dir, method="prumerge")(pixels)
        raw = PruMergeEncoder.from_pretrained(llava_dir, method="prumerge", project=False)(pixels)
        projector = hf.model.multi_modal_projector
        for b in range(2):
            n = int(reduced.num_tokens[b])
            torch.testing.assert_close(reduced.tokens[b, :n], projector(raw.tokens[b, :n]), rtol=1e-5, atol=1e-5)
            assert (reduced.tokens[b, n:] == 0).all(), "padding must stay zero after the projector's bias"


def test_legacy_key_layout_and_shards_load(tmp_path, llava_dir):
    """llava-hf checkpoints on the hub use transformers 4.x names (vision_tower.vision_model.*) and shards."""
    state = load_file(str(llava_dir / "model.safetensors"))
    legacy = {}
    for key, value in state.items():
        if key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        legacy[key] = value.contiguous()
    names = sorted(legacy)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("model-00001-of-00002.safetensors", names[:half]), ("model-00002-of-00002.safetensors", names[half:])):
        save_file({n: legacy[n] for n in part}, str(tmp_path / shard))
        weight_map.update({n: shard for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((llava_dir / "config.json").read_text())

    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        a = PruMergeEncoder.from_pretrained(tmp_path)(pixels)
        b = PruMergeEncoder.from_pretrained(llava_dir)(pixels)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.tokens, b.tokens)


def test_other_grids_and_feature_layers(tmp_path):
    """A 224/14 grid (16x16) and a LLaVA that reads the last layer (-1) both work."""
    model = tiny_llava(image_size=224)
    model.config.vision_feature_layer = -1
    model.save_pretrained(tmp_path)
    encoder = PruMergeEncoder.from_pretrained(tmp_path, method="prumerge+", project=False)
    assert encoder.num_patches == 256 and encoder.capacity == 257
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = encoder(pixels)
        hidden, q, k = hf_features_and_qk(model.model.vision_tower, pixels, feature_layer=-1)
    expected = reduce_tokens(hidden[:, 1:], q, k, ReducerConfig(method="prumerge+"))
    assert torch.equal(out.indices, expected.indices)
    torch.testing.assert_close(out.tokens, expected.tokens, rtol=1e-5, atol=1e-5)


def test_full_feature_strategy_keeps_cls_for_none(tmp_path):
    model = tiny_llava()
    model.config.vision_feature_select_strategy = "full"
    model.save_pretrained(tmp_path)
    out = PruMergeEncoder.from_pretrained(tmp_path, method="none")(torch.randn(1, 3, 112, 112))
    assert out.num_tokens.tolist() == [65] and out.indices[0, :2].tolist() == [-1, 0]


def test_bad_inputs_and_checkpoints(tmp_path, clip_dir):
    encoder = PruMergeEncoder.from_pretrained(clip_dir)
    with pytest.raises(InputError, match=r"pixel_values must be \[batch, 3, 112, 112\]"):
        encoder(torch.randn(1, 3, 224, 224))
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        encoder([[0.0]])
    with pytest.raises(InputError, match="NaN or Inf"):
        encoder(torch.full((1, 3, 112, 112), float("nan")))

    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a hub id"):
        PruMergeEncoder.from_pretrained(tmp_path / "nowhere" / "deep")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        PruMergeEncoder.from_pretrained(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((clip_dir / "config.json").read_text())
    state = load_file(str(clip_dir / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "layers.2" not in k}, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="vision tower weights missing"):
        PruMergeEncoder.from_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        PruMergeEncoder.from_pretrained(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not supported"):
        PruMergeEncoder.from_pretrained(broken)
