"""Tower families: DINOv2 (CLS, registers excluded) and SigLIP (no CLS: received attention) through the same
reducer and ONNX path as CLIP, each against a reference computed from transformers' own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prumerge import PruMergeEncoder
from prumerge.export.build import build_artifact
from prumerge.export.options import BuildOptions
from prumerge.export.validate import synthetic_pixels
from prumerge.reduce import ReducerConfig, reduce_tokens
from prumerge.runtime import VisionSession
from reference import reference_prumerge

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=112, patch_size=14)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    model = Dinov2Model(Dinov2Config(**SMALL, mlp_ratio=2)).eval()
    path = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(4)
    model = SiglipVisionModel(SiglipVisionConfig(**SMALL, intermediate_size=64)).eval()
    path = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(path)
    return path


def _hooked(model, layer, attention_attr, pixels, **kwargs):
    captured = {}
    attention = getattr(layer, attention_attr)
    hooks = [attention.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
             attention.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))]
    try:
        out = model(pixels, output_hidden_states=True, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out, captured["q"], captured["k"]


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_dinov2_matches_reference(dinov2_dir, method):
    from transformers import Dinov2Model

    hf = Dinov2Model.from_pretrained(dinov2_dir).eval()
    encoder = PruMergeEncoder.from_pretrained(dinov2_dir, method=method)
    assert encoder.adapter.family == "dinov2" and encoder.adapter.prefix_tokens == 1
    pixels = torch.from_numpy(synthetic_pixels(4, 112, seed=2))
    with torch.no_grad():
        out = encoder(pixels)
        ref_out, q, k = _hooked(hf, hf.encoder.layer[-1], "attention", pixels)
    features = ref_out.last_hidden_state[:, 1:]  # layer-normed last layer, as Dinov2Model returns it
    for b in range(4):
        tokens, idx = reference_prumerge(features[b], q[b], k[b], plus=method == "prumerge+")
        n = int(out.num_tokens[b])
        assert out.indices[b, : n - 1].tolist() == idx
        torch.testing.assert_close(out.tokens[b, :n], tokens, rtol=1e-5, atol=1e-5)


def test_dinov2_registers_are_not_patches(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(5)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=4)).eval()
    model.save_pretrained(tmp_path)
    encoder = PruMergeEncoder.from_pretrained(tmp_path)
    assert encoder.adapter.prefix_tokens == 5
    with torch.no_grad():
        out = encoder(torch.from_numpy(synthetic_pixels(2, 112)))
        base = PruMergeEncoder.from_pretrained(tmp_path, method="none")(torch.from_numpy(synthetic_pixels(2, 112)))
    assert base.num_tokens.tolist() == [64, 64]
    for b in range(2):
        n = int(out.num_tokens[b])
        assert all(0 <= i < 64 for i in out.indices[b, : n - 1].tolist())


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_siglip_received_attention(siglip_dir, method):
    from transformers import SiglipVisionModel

    hf = SiglipVisionModel.from_pretrained(siglip_dir, attn_implementation="eager").eval()
    encoder = PruMergeEncoder.from_pretrained(siglip_dir, method=method)
    assert encoder.adapter.prefix_tokens == 0 and encoder.adapter.importance == "received_attention"
    pixels = torch.from_numpy(synthetic_pixels(3, 112, seed=4))
    with torch.no_grad():
        out = encoder(pixels)
        ref_out, q, k = _hooked(hf, hf.encoder.layers[-1], "self_attn", pixels, output_attentions=True)
    scores = ref_out.attentions[-1].mean(dim=(1, 2))  # [B, P]: mean over heads and queries of the last layer
    features = ref_out.last_hidden_state  # post-layernorm, no CLS
    for b in range(3):
        tokens, idx = reference_prumerge(features[b], q[b], k[b], plus=method == "prumerge+", scores=scores[b])
        n = int(out.num_tokens[b])
        assert out.indices[b, : n - 1].tolist() == idx
        torch.testing.assert_close(out.tokens[b, :n], tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dinov2", "siglip"])
def test_families_export_and_run(family, dinov2_dir, siglip_dir, tmp_path):
    source = {"dinov2": dinov2_dir, "siglip": siglip_dir}[family]
    manifest = build_artifact(str(source), tmp_path / family, BuildOptions(ReducerConfig(method="prumerge+"), llm=None))
    assert manifest.validation.indices_identical and manifest.source.model_type.startswith(family)
    encoder = PruMergeEncoder.from_pretrained(source, method="prumerge+")
    pixels = synthetic_pixels(20, 112, seed=9)
    got = VisionSession.open(tmp_path / family).run_pixels(pixels)
    with torch.no_grad():
        ref = encoder(torch.from_numpy(pixels))
    assert np.array_equal(got.num_tokens, ref.num_tokens.numpy()) and np.array_equal(got.indices, ref.indices.numpy())
    np.testing.assert_allclose(got.tokens, ref.tokens.numpy(), atol=1e-4)


def test_older_transformers_dinov2_layout_gives_the_same_tokens(dinov2_dir):
    """transformers releases before the attention refactor (5.17, as on the GPU machine) name DINOv2's projections
    ``attention.attention.query/key`` and take no ``attention_mask`` in the layer's forward; both layouts must give
    the same tokens (a layout the adapter did not know was an AttributeError / TypeError for those users)."""
    from torch import nn

    encoder = PruMergeEncoder.from_pretrained(dinov2_dir, method="prumerge").eval()
    if not hasattr(encoder.adapter.layers[0].attention, "q_proj"):
        pytest.skip("this transformers already has the old layout (its own run is the check)")
    pixels = torch.from_numpy(synthetic_pixels(2, encoder.image_size))
    with torch.no_grad():
        expected = encoder(pixels)

    class OldSelfAttention(nn.Module):
        def __init__(self, new):
            super().__init__()
            self.query, self.key = new.q_proj, new.k_proj

    class OldAttention(nn.Module):
        def __init__(self, new):
            super().__init__()
            self.attention = OldSelfAttention(new)
            self.new = new

        def forward(self, hidden):
            return self.new(hidden)[0]

    class OldLayer(nn.Module):  # forward(hidden_states) only, as in 5.17
        def __init__(self, new):
            super().__init__()
            self.new = new
            self.norm1, self.attention = new.norm1, OldAttention(new.attention)

        def forward(self, hidden_states):
            return self.new(hidden_states)

    layers = encoder.adapter.layers
    for i in range(len(layers)):
        layers[i] = OldLayer(layers[i])
    with torch.no_grad():
        got = encoder(pixels)
    assert torch.equal(got.indices, expected.indices)
    torch.testing.assert_close(got.tokens, expected.tokens, rtol=0, atol=0)
