"""VisionZip and DivPrune: each against its official code on the same inputs, batched equal to per-image, and end
to end through build (validation, TensorRT op support), verify, run, inspect and profile with the same contract.

The references below are the official functions, copied (as the test's reference only) with their sources named,
reshaped as little as running them needs: the HF model's own attentions and a k_proj hook stand in for the
monkey-patched CLIP attention that stores ``metric``.
"""

from __future__ import annotations

import json


import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from prumerge.artifact.contract import CLS_TOKEN_INDEX, CONTEXTUAL_TOKEN_INDEX
from prumerge.errors import ConfigError
from prumerge.model.encoder import PruMergeEncoder
from prumerge.reduce.config import ReducerConfig


# ----------------------------------------------------------------------------------------------- official VisionZip
def official_visionzip(attn_weights, hidden_states, metric, dominant_num, contextual_num):
    """github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py`` (the released core; ``dominant_num`` is
    what ``apply_info`` stores: the dominant count less the CLS token), ``attn_weights`` = ``attentions[-2]``,
    ``hidden_states`` = ``hidden_states[-2]``, ``metric`` = ``layers[-2]``'s ``raw_key_states.mean(1)``."""
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype,
                                         device=topk_indices.device), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool, device=metric.device).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1,
                                                                            hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=metric_normalized.device)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1],
                                                                     device=metric_normalized.device), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                                 dtype=hidden_states_filtered.dtype, device=metric_normalized.device)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1],
                                                                         device=hidden_states_filtered.device),
                                                            target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    return hidden_states_save, all_indices


# ----------------------------------------------------------------------------------------------- official DivPrune
def pairwise_cosine_similarity(matrix):
    """github.com/vbdi/divprune (also ModelTC/llmc ``token_reduction/divprune.py``)."""
    norm_matrix = matrix / matrix.norm(dim=1, keepdim=True)
    cosine_similarity = torch.mm(norm_matrix, norm_matrix.t())
    return cosine_similarity


def official_divprune(visual_feature_vectors, threshold_terms):
    """github.com/vbdi/divprune's ``DivPrune`` (``threshold_terms`` given directly, as its fixed-count variant)."""
    cosine_matrix = 1.0 - (pairwise_cosine_similarity(visual_feature_vectors))
    s = torch.empty(threshold_terms, dtype=torch.long, device=visual_feature_vectors.device)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i, device=cosine_matrix.device)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]  # for distance
        else:
            scores = torch.min(m2, dim=0).values  # for distance
        phrase_to_add_idx = torch.argmax(scores)
        s[i] = phrase_to_add_idx
    return s


# ------------------------------------------------------------------------------------------------------ helpers
def hf_visionzip_inputs(hf, pixels):
    """The official code's inputs from a CLIPVisionModel: ``attentions[-2]``, ``hidden_states[-2]`` and the metric
    (``layers[-2]``'s k_proj output split into heads and averaged over them)."""
    captured = {}
    layer = hf.vision_model.encoder.layers[-2] if hasattr(hf, "vision_model") else hf.encoder.layers[-2]
    attention = layer.self_attn
    hook = attention.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    try:
        out = hf(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    finally:
        hook.remove()
    batch, tokens, width = captured["k"].shape
    heads = hf.config.num_attention_heads
    raw_key_states = captured["k"].view(batch, tokens, heads, width // heads).transpose(1, 2)
    return out.attentions[-2], out.hidden_states[-2], raw_key_states.mean(1)


def test_visionzip_matches_the_official_code_on_a_clip_tower(clip_dir):
    from transformers import CLIPVisionModel

    hf = CLIPVisionModel.from_pretrained(clip_dir, attn_implementation="eager").eval()
    encoder = PruMergeEncoder.from_pretrained(clip_dir, method="visionzip", dominant_tokens=12, contextual_tokens=5)
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        out = encoder(pixels)
        attn, hidden, metric = hf_visionzip_inputs(hf, pixels)
        expected, kept = official_visionzip(attn, hidden, metric, dominant_num=11, contextual_num=5)
    assert out.tokens.shape == (4, 17, 32) and out.num_tokens.tolist() == [17] * 4 and not out.truncated.any()
    for b in range(4):
        assert out.indices[b, 0] == CLS_TOKEN_INDEX and (out.indices[b, 12:] == CONTEXTUAL_TOKEN_INDEX).all()
        assert out.indices[b, 1:12].tolist() == sorted((kept[b, 1:] - 1).tolist())  # dominant patches, raster order
    torch.testing.assert_close(out.tokens, expected, rtol=1e-5, atol=1e-5)


def test_divprune_matches_the_official_code_on_projected_tokens(llava_dir):
    """Chosen among the tokens the LLM receives (after the projector), as the official code; the kept set and
    tokens identical; the output in raster order."""
    encoder = PruMergeEncoder.from_pretrained(llava_dir, method="divprune", diverse_tokens=13)
    raw = PruMergeEncoder.from_pretrained(llava_dir, method="none")  # projected, every patch
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        out = encoder(pixels)
        every = raw(pixels).tokens
    for b in range(3):
        chosen = sorted(official_divprune(every[b], 13).tolist())
        assert out.indices[b].tolist() == chosen
        torch.testing.assert_close(out.tokens[b], every[b, chosen])


def test_divprune_on_duplicates_and_flat_features_picks_as_the_official_code():
    """Exact ties (duplicated tokens: distance 0 between them) are where an argmax rule shows: first index wins in
    both."""
    from prumerge.reduce.divprune import divprune_indices

    rng = np.random.default_rng(3)
    base = torch.from_numpy(rng.normal(size=(20, 8)).astype(np.float32))
    x = torch.cat([base, base[:6], base[3:9]])  # 32 tokens, 12 of them duplicates
    for keep in (1, 5, 20, 26):
        assert divprune_indices(x.unsqueeze(0), keep)[0].tolist() == sorted(official_divprune(x, keep).tolist())


def test_batched_equals_per_image_and_options_are_checked(llava_dir):
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, 112, 112)
    for method, options in (("visionzip", dict(dominant_tokens=9, contextual_tokens=3)), ("divprune", dict(diverse_tokens=7))):
        encoder = PruMergeEncoder.from_pretrained(llava_dir, method=method, **options)
        with torch.no_grad():
            batched = encoder(pixels)
            for b in range(3):
                alone = encoder(pixels[b:b + 1])
                assert torch.equal(alone.indices[0], batched.indices[b])
                torch.testing.assert_close(alone.tokens[0], batched.tokens[b], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="fixed count"):
        ReducerConfig(method="visionzip", capacity=20)
    for bad in (0, "12", 3.0, True):  # a manifest's JSON or a caller: one ConfigError, never int()'s ValueError
        with pytest.raises(ConfigError, match="diverse_tokens must be an integer >= 1"):
            ReducerConfig(method="divprune", diverse_tokens=bad)
    from prumerge.calib.budget import calibrate_budget

    with pytest.raises(ConfigError, match="keeps a fixed count"):
        calibrate_budget(str(llava_dir), None, ["prumerge", "divprune"])
    with pytest.raises(ConfigError, match="at most 64"):
        PruMergeEncoder.from_pretrained(llava_dir, method="visionzip", dominant_tokens=60, contextual_tokens=10)


@pytest.fixture(scope="module")
def built(llava_dir, tmp_path_factory):
    """Both methods built through the CLI, with the tiny LLM (fp32) so they also answer end to end."""
    from prumerge.cli import main

    out = {}
    for method, flags in (("visionzip", ["--dominant-tokens", "10", "--contextual-tokens", "4"]),
                          ("divprune", ["--diverse-tokens", "12"])):
        directory = tmp_path_factory.mktemp("fixed") / method
        result = CliRunner().invoke(main, ["build", str(llava_dir), "--out", str(directory), "--method", method,
                                           "--llm-precision", "fp32", "--llm-kv-cache", "float", *flags])
        assert result.exit_code == 0, result.output
        out[method] = directory
    return out


@pytest.mark.parametrize("method,count", [("visionzip", 14), ("divprune", 12)])
def test_built_graph_validates_verifies_runs_and_passes_tensorrt_op_support(built, llava_dir, method, count):
    from prumerge.artifact.manifest import Manifest
    from prumerge.cli import main
    from prumerge.runtime import VisionSession

    manifest = Manifest.read(built[method])
    assert manifest.vision.method == method and manifest.vision.capacity == count
    assert manifest.validation.ok and manifest.validation.indices_identical
    assert manifest.vision.tensorrt["10.3"].ok, manifest.vision.tensorrt["10.3"].line()
    verify = CliRunner().invoke(main, ["verify", str(built[method])])
    assert verify.exit_code == 0, verify.output
    torch.manual_seed(5)
    pixels = torch.randn(2, 3, 112, 112)
    session = VisionSession.open(built[method])
    got = session.run_pixels(pixels.numpy())
    options = dict(dominant_tokens=10, contextual_tokens=4) if method == "visionzip" else dict(diverse_tokens=12)
    with torch.no_grad():
        expected = PruMergeEncoder.from_pretrained(llava_dir, method=method, **options)(pixels)
    assert got.num_tokens.tolist() == [count, count]
    assert np.array_equal(got.indices, expected.indices.numpy())
    np.testing.assert_allclose(got.tokens, expected.tokens.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["visionzip", "divprune"])
def test_inspect_draws_what_the_reducer_chose_and_profile_attributes_its_nodes(built, llava_dir, tmp_path, method):
    from prumerge.artifact.node_stages import classify_nodes
    from prumerge.cli import main

    rng = np.random.default_rng(0)
    image = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(image)
    result = CliRunner().invoke(main, ["inspect", str(image), "--model", str(built[method]), "--method", method,
                                       "--out", str(tmp_path / "x.out.png")])
    assert result.exit_code == 0, result.output
    from prumerge.heatmap import render
    from prumerge.export.reference import artifact_encoder
    from prumerge.artifact.manifest import Manifest

    encoder = artifact_encoder(Manifest.read(built[method]), method=method, project=method == "divprune", capacity=False)
    drawn = render(Image.open(image), method=method, out=tmp_path / "y.png", encoder=encoder)
    if method == "visionzip":
        assert drawn.kept == drawn.reducer_indices and len(drawn.sampled) == 4 and drawn.num_tokens == 14
        assert f"dominant patches: {drawn.kept}" in result.output
    else:
        assert drawn.kept == drawn.reducer_indices and len(drawn.kept) == 12 and len(drawn.pruned_only_in_extra) == 52
        assert f"chosen patches: {drawn.kept}" in result.output
    stages = list(classify_nodes(built[method] / "vision.onnx").values())
    # the method's own nodes carry the reducer's source path (profile splits time by it, INT8 keeps them float)
    assert stages.count("reducer") > 10, {s: stages.count(s) for s in set(stages)}


@pytest.mark.parametrize("method,count", [("visionzip", 14), ("divprune", 12)])
def test_run_and_profile_from_the_cli(built, tmp_path, method, count):
    from prumerge.cli import main

    image = tmp_path / "img.png"
    Image.new("RGB", (160, 120), (30, 160, 60)).save(image)
    answer = CliRunner().invoke(main, ["run", str(built[method]), "--image", str(image), "--prompt", "<image> describe",
                                       "--max-new-tokens", "3", "--json"])
    assert answer.exit_code == 0, answer.output
    data = json.loads(answer.output)
    assert data["method"] == method and data["visual_tokens"] == [count]
    result = CliRunner().invoke(main, ["profile", str(built[method]), "--synthetic", "1", "--runs", "1", "--warmup", "0",
                                       "--max-new-tokens", "1", "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p.json").read_text())["methods"][0]
    assert report["method"] == method and report["stages"]["reducer"]["p50"] > 0


def test_int8_visionzip_keeps_its_reducer_float_and_records_agreement(llava_dir, tmp_path):
    """INT8 (static Q/DQ) of a VisionZip graph: the calibration file gives only the image set (no capacity), no node of
    the method reads a quantised tensor, and the recorded agreement pairs its CLS and contextual tokens."""
    from conftest import quantised_reducer_check
    from prumerge.calib.budget import calibrate_budget
    from prumerge.calib.images import CalibrationSet
    from prumerge.export.build import build_artifact
    from prumerge.export.options import BuildOptions, Int8Options

    calibration = calibrate_budget(str(llava_dir), CalibrationSet.synthetic(6, 0), ["prumerge"], 0.9).write(tmp_path / "c.json")
    manifest = build_artifact(str(llava_dir), tmp_path / "int8", BuildOptions(
        ReducerConfig(method="visionzip", dominant_tokens=10, contextual_tokens=4), llm=None, int8=Int8Options(),
        calibration=str(calibration)))
    assert manifest.vision.precision == "int8" and manifest.vision.capacity == 14
    agreement = manifest.vision.int8.agreement
    assert agreement.images == 6 and 0 < agreement.mean_jaccard <= 1 and agreement.mean_count_diff == 0
    assert 0.9 < agreement.mean_cosine <= 1.0 + 1e-6  # CLS, dominant and contextual tokens all paired
    reducer_nodes, quantise_nodes = quantised_reducer_check(tmp_path / "int8" / "vision.onnx")
    assert reducer_nodes > 10 and quantise_nodes > 5
