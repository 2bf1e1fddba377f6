"""Real checkpoint layouts: image size from the processor (position embeddings interpolated as transformers does),
validation that tells near-ties from real disagreements, exact ties broken by the lowest patch index everywhere,
and original-LLaVA-layout checkpoints (merged, and LoRA like the released PruMerge ones) converted to llava-hf."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from prumerge import PruMergeEncoder
from prumerge.errors import CheckpointError, ValidationError
from prumerge.export.build import build_artifact
from prumerge.export.options import BuildOptions, GraphOptions, SourceOptions
from prumerge.reduce.config import ReducerConfig
from prumerge.export.validate import compare_outputs, require, synthetic_pixels
from conftest import TINY_VOCAB, tiny_tokenizer, tiny_vision_config

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=112, patch_size=14)


def _with_processor(src, dst, crop):
    shutil.copytree(src, dst)
    processor = {"do_resize": True, "size": {"shortest_edge": crop}, "do_center_crop": True,
                 "crop_size": {"height": crop, "width": crop}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (dst / "preprocessor_config.json").write_text(json.dumps(processor))
    return dst


# ------------------------------------------------------------------------------------------------ image size
@pytest.mark.parametrize("family", ["clip", "dinov2", "siglip"])
def test_image_size_from_processor_matches_transformers_interpolation(family, clip_dir, tmp_path):
    """Config says 112 px (8x8); the processor crops to 84 (6x6). Features equal transformers' own forward with
    interpolated position embeddings at 84 px (CLIP/SigLIP: interpolate_pos_encoding=True; DINOv2 always does)."""
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(5)
    if family == "clip":
        src = clip_dir
    else:
        model = (Dinov2Model(Dinov2Config(**SMALL, mlp_ratio=2)) if family == "dinov2"
                 else SiglipVisionModel(SiglipVisionConfig(**SMALL, intermediate_size=64)))
        src = tmp_path / "src"
        model.save_pretrained(src)
    checkpoint = _with_processor(src, tmp_path / "ckpt", 84)
    encoder = PruMergeEncoder.from_pretrained(checkpoint, method="none")
    assert (encoder.image_size, encoder.grid, encoder.num_patches) == (84, 6, 36)
    pixels = torch.from_numpy(synthetic_pixels(2, 84))
    reference_model = type(encoder.tower).from_pretrained(src).eval()
    kwargs = {} if family == "dinov2" else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        ours = encoder(pixels).tokens
        hidden = reference_model(pixels, output_hidden_states=True, **kwargs)
    if family == "clip":
        expected = hidden.hidden_states[-2][:, 1:]
    elif family == "dinov2":
        expected = hidden.last_hidden_state[:, 1:]
    else:
        expected = hidden.last_hidden_state
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-5), float((ours - expected).abs().max())
    # an explicit size overrides the processor's; the config size itself needs no interpolation
    assert PruMergeEncoder.from_pretrained(checkpoint, method="none", image_size=112).num_patches == 64
    with pytest.raises(CheckpointError, match="multiple of the patch size"):
        PruMergeEncoder.from_pretrained(checkpoint, method="none", image_size=90)


def test_build_records_image_size_and_runs_at_it(clip_dir, tmp_path):
    checkpoint = _with_processor(clip_dir, tmp_path / "ckpt", 84)
    manifest = build_artifact(str(checkpoint), tmp_path / "art", BuildOptions(ReducerConfig(method="prumerge+"), llm=None))
    assert manifest.reducer.image_size == 84 and manifest.reducer.grid == 6
    assert manifest.vision.inputs[0].shape == ["batch", 3, 84, 84]
    assert manifest.preprocess.crop_height == 84
    from prumerge.export.verify import verify_artifact

    assert verify_artifact(tmp_path / "art", images=2)["reference"]["ok"]


# ------------------------------------------------------------------------------------------------ validation rule
def _contract(tokens, num_tokens, indices):
    from prumerge.artifact.contract import VisionOutput

    return VisionOutput(tokens, np.asarray(num_tokens), np.asarray(indices), np.zeros(len(tokens), bool))


def _arrays(tokens, count):
    return _contract(tokens, [count], np.arange(tokens.shape[1])[None])


def test_per_token_validation_explains_only_near_ties():
    reference = np.zeros((1, 4, 8), np.float32)
    candidate = reference.copy()
    candidate[0, 1] += 3e-3  # one token off by 3e-3
    wide = np.array([[1e-2, 1e-2, 1e-2, 1e-2]])
    tie = np.array([[1e-2, 1e-7, 1e-2, 1e-2]])
    result = compare_outputs(_arrays(reference, 4), _arrays(candidate, 4), 1e-4, "cpu", gaps=tie, epsilon=2e-5)
    assert (result.tokens, result.tokens_exact, result.near_ties, result.unexplained) == (4, 3, 1, 0) and result.ok
    assert result.worst_explained == pytest.approx(3e-3, rel=1e-3)
    result = compare_outputs(_arrays(reference, 4), _arrays(candidate, 4), 1e-4, "cpu", gaps=wide, epsilon=2e-5)
    assert (result.near_ties, result.unexplained) == (0, 1) and not result.ok
    with pytest.raises(ValidationError, match=r"1 token\(s\) differ .* by up to 0.003"):
        require(result, "validation of x")
    # no gaps: nothing is explained
    assert compare_outputs(_arrays(reference, 4), _arrays(candidate, 4), 1e-4, "cpu").unexplained == 1


def _scores(num_patches=64, outliers=(5, 9, 30), seed=0):
    """Attention-like scores: a flat floor with a few clear outliers; returns (scores, IQR threshold)."""
    import torch

    from prumerge.reduce.outliers import iqr_threshold

    rng = np.random.default_rng(seed)
    scores = 1.0 + 0.05 * rng.random(num_patches)
    for rank, patch in enumerate(outliers):
        scores[patch] = 3.0 - 0.5 * rank
    threshold = float(iqr_threshold(torch.from_numpy(scores)[None])[0])
    return scores, threshold


def test_selection_rule_allows_only_what_the_reference_scores_allow():
    from prumerge.export.validate import selection_within

    scores, threshold = _scores()
    assert all(scores[[5, 9, 30]] > threshold) and (scores > threshold).sum() == 3
    assert selection_within(scores, threshold, [5, 9, 30], False, 1, 3e-2)  # the reference's own selection
    assert not selection_within(scores, threshold, [5, 9], False, 1, 3e-2)  # patch 30 is 2x the threshold
    assert not selection_within(scores, threshold, [9, 5, 30], False, 1, 3e-2)  # 2.5 vs 3.0: not a near-equal pair
    assert not selection_within(scores, threshold, [5, 9, 31], False, 1, 3e-2)  # 31 is not a top-3 patch
    # a patch 1% above the threshold: dropping it, or keeping a patch 1% below it, is within a 3% perturbation ...
    near = scores.copy()
    near[40], near[41] = threshold * 1.01, threshold * 0.99
    assert selection_within(near, threshold, [5, 9, 30], False, 1, 3e-2)
    assert selection_within(near, threshold, [5, 9, 30, 40, 41], False, 1, 3e-2)
    assert selection_within(near, threshold, [5, 9, 30, 41, 40], False, 1, 3e-2)  # swapped: 2% apart
    # ... and not with the exact rule's epsilon, nor for a patch 10% below
    assert not selection_within(near, threshold, [5, 9, 30], False, 1, 1e-3)
    near[41] = threshold * 0.9
    assert not selection_within(near, threshold, [5, 9, 30, 40, 41], False, 1, 3e-2)


def test_selection_rule_checks_prumerge_plus_samples():
    from prumerge.export.validate import _plus_samples, selection_within

    scores, threshold = _scores()
    kept = [5, 9, 30]
    assert selection_within(scores, threshold, kept + _plus_samples(kept, 64), True, 1, 3e-2)
    wrong = kept + _plus_samples(kept, 64)[:-1]  # one sample missing
    assert not selection_within(scores, threshold, wrong, True, 1, 3e-2)
    near = scores.copy()
    near[40] = threshold * 1.01  # a fourth outlier by 1%: its stride's samples are the candidate's
    four = [5, 9, 30, 40]
    assert selection_within(near, threshold, kept + _plus_samples(kept, 64), True, 1, 3e-2)
    assert selection_within(near, threshold, four + _plus_samples(four, 64), True, 1, 3e-2)
    assert not selection_within(near, threshold, four + _plus_samples(kept, 64), True, 1, 3e-2)


def test_fp32_allows_only_an_order_swap_among_near_tied_kept_patches():
    """fp32: the kept set and count stay exact; two kept patches whose scores tie within 5e-5 may swap order (the
    real DINOv2-S at 518 px did), a swap of clearly different scores or any set change still fails."""
    from types import SimpleNamespace

    from prumerge.export.validate import selection_rule

    scores, threshold = _scores()
    tied = scores.copy()
    tied[9] = tied[5] * (1 - 1e-5)
    reducer = SimpleNamespace(method=SimpleNamespace(value="prumerge"), order=SimpleNamespace(value="official"), min_keep=1)
    rule = selection_rule(reducer, tied[None], np.array([threshold]), "fp32")
    assert rule["same_set"] and rule["epsilon"] == 5e-5

    def output(selected):
        n = len(selected) + 1
        tokens = np.zeros((1, 8, 4), np.float32)
        tokens[0, :n - 1] = np.asarray(selected, dtype=np.float32)[:, None]
        indices = np.full((1, 8), -2)
        indices[0, :n] = list(selected) + [-1]
        return _contract(tokens, [n], indices)

    reference = output([5, 9, 30])
    swapped = compare_outputs(reference, output([9, 5, 30]), 1e-4, "cpu", selection=rule)
    assert swapped.ok and swapped.selection_moved == 1 and swapped.unexplained == 0
    far = dict(rule, scores=scores[None])  # 3.0 vs 2.5: not a tie
    assert compare_outputs(reference, output([9, 5, 30]), 1e-4, "cpu", selection=far).selection_unexplained == 1
    near = tied.copy()
    near[40] = threshold * (1 + 1e-5)  # a count change within 5e-5 is still refused in fp32: the set is exact
    rule_near = dict(rule, scores=near[None])
    assert compare_outputs(output([5, 9, 30, 40]), output([5, 9, 30]), 1e-4, "cpu", selection=rule_near).selection_unexplained == 1


def test_moved_selection_passes_only_with_the_rule_and_compares_common_tokens():
    scores, threshold = _scores()
    near = scores.copy()
    near[40] = threshold * 1.01
    width = 6
    features = np.random.default_rng(1).normal(size=(64, width)).astype(np.float32)

    def output(selected):
        n = len(selected) + 1
        tokens = np.zeros((1, 8, width), np.float32)
        tokens[0, :n - 1] = features[selected]
        tokens[0, n - 1] = 7.0  # the extra token: differs when the selection differs
        indices = np.full((1, 8), -2)
        indices[0, :n] = list(selected) + [-1]
        return _contract(tokens, [n], indices)

    reference, moved = output([5, 9, 30, 40]), output([5, 9, 30])
    moved.tokens[0, 3] = 9.0  # the extra token's value moves with the selection: not compared
    selection = dict(scores=near[None], thresholds=np.array([threshold]), plus=False, min_keep=1, epsilon=3e-2)
    result = compare_outputs(reference, moved, 1e-4, "cpu", selection=selection)
    assert result.ok and (result.selection_moved, result.selection_unexplained, result.tokens) == (1, 0, 3)
    assert require(result, "x") is result
    exact = compare_outputs(reference, moved, 1e-4, "cpu")  # no rule: a moved selection fails
    assert not exact.ok and exact.selection_unexplained == 1
    with pytest.raises(ValidationError, match="token counts differ"):
        require(exact, "validation of x")
    moved.tokens[0, 1] += 1.0  # a common patch's token differs: still a failure under the rule
    assert compare_outputs(reference, moved, 1e-4, "cpu", selection=selection).unexplained == 1
    far = near.copy()
    far[41] = threshold * 0.9  # keeping a patch 10% under the threshold is no near-tie: unexplained
    selection_far = dict(selection, scores=far[None])
    assert compare_outputs(reference, output([5, 9, 30, 41]), 1e-4, "cpu", selection=selection_far).selection_unexplained == 1


def test_a_graph_that_disagrees_with_pytorch_fails_the_build(clip_dir, tmp_path, monkeypatch):
    """The build's validation gate: an exported graph whose weights differ from the reference is refused, and
    nothing is left at --out."""
    from prumerge.export import graph

    real_export = graph.export_onnx

    def export_perturbed(encoder, path, *args, **kwargs):
        layer = encoder.adapter.layers[0].mlp.fc2
        saved = layer.bias.detach().clone()
        with torch.no_grad():
            layer.bias.add_(0.05)
        try:
            return real_export(encoder, path, *args, **kwargs)
        finally:
            with torch.no_grad():
                layer.bias.copy_(saved)

    monkeypatch.setattr(graph, "export_onnx", export_perturbed)
    with pytest.raises(ValidationError, match="validation of vision.onnx"):
        build_artifact(str(clip_dir), tmp_path / "art", BuildOptions(graph=GraphOptions(validate_images=2), llm=None))
    assert not (tmp_path / "art").exists()
    assert not list(tmp_path.glob(".art.partial-*"))


def test_exact_ties_pick_the_lowest_patch_index_in_torch_and_onnxruntime(tmp_path):
    """Duplicated keys make exact ties at the neighbour boundary; both runtimes merge the same (lowest-index)
    patches, so the tokens agree exactly, not only up to a near-tie allowance."""
    import onnxruntime as ort

    from prumerge.reduce import ReducerConfig, reduce_tokens
    from prumerge.reduce.ranking import top_indices

    values = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    assert top_indices(values, 4).tolist() == [[1, 3, 0, 2]]
    assert top_indices(values, 3, largest=False).tolist() == [[4, 0, 2]]

    class Reducer(torch.nn.Module):
        def forward(self, features, q, k):
            return tuple(reduce_tokens(features, q, k, ReducerConfig(method="prumerge+", neighbors=4)))

    torch.manual_seed(0)
    patches, width = 36, 16
    base = torch.randn(6, width)
    k = torch.cat([torch.randn(1, width), base[torch.arange(patches) % 6]]).unsqueeze(0)  # 6 distinct keys, 6 copies each
    q = torch.randn(1, patches + 1, width) * 3
    features = torch.randn(1, patches, width)
    path = tmp_path / "reducer.onnx"
    torch.onnx.export(Reducer(), (features, q, k), str(path), dynamo=True, opset_version=18)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {
        "features": features.numpy(), "q": q.numpy(), "k": k.numpy()})
    ref = Reducer()(features, q, k)
    assert np.array_equal(got[1], ref[1].numpy()) and np.array_equal(got[2], ref[2].numpy())
    assert np.abs(got[0] - ref[0].numpy()).max() < 1e-5


# ------------------------------------------------------------------------------------------------ original LLaVA layout
def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def _original_config(llm_config: dict, tower) -> dict:
    return {**llm_config, "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
            "mm_vision_tower": str(tower), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "image_aspect_ratio": "pad",
            "mm_use_im_start_end": False}


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    from transformers import CLIPVisionModel

    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("tower")
    CLIPVisionModel(tiny_vision_config()).eval().save_pretrained(path)
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 112},
                 "do_center_crop": True, "crop_size": {"height": 112, "width": 112}, "resample": 3,
                 "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path


@pytest.fixture(scope="module")
def projector_weights():
    torch.manual_seed(12)
    return {"model.mm_projector.0.weight": torch.randn(64, 32) * 0.2, "model.mm_projector.0.bias": torch.randn(64) * 0.1,
            "model.mm_projector.2.weight": torch.randn(64, 64) * 0.2, "model.mm_projector.2.bias": torch.randn(64) * 0.1}


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, tower_dir, projector_weights):
    """A released-PruMerge-style LoRA checkpoint made with peft: adapter (.bin, as released), non-LoRA
    trainables with peft prefixes, original-layout config; plus its base LLM directory."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    base = _tiny_llama()
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    peft_model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(13)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # peft initialises B to zero: make the adapter do something
    adapter = root / "prumerge-lora"
    peft_model.save_pretrained(adapter, safe_serialization=False)
    config = json.loads((root / "base" / "config.json").read_text())
    (adapter / "config.json").write_text(json.dumps(_original_config(config, tower_dir)))
    torch.save({f"base_model.model.{k}": v for k, v in projector_weights.items()}, adapter / "non_lora_trainables.bin")
    merged = peft_model.merge_and_unload().eval()  # peft's own merge: the independent reference
    return {"adapter": adapter, "base": root / "base", "reference": merged}


@pytest.fixture(scope="module")
def merged_checkpoint(tmp_path_factory, tower_dir, projector_weights):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("merged")
    llm = _tiny_llama(seed=3)
    llm.save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    state = {k: v.contiguous() for k, v in llm.state_dict().items()} | projector_weights
    (root / "model.safetensors").unlink()
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(_original_config(config, tower_dir)))
    return {"dir": root, "reference": llm}


def _projected_reference(tower_dir, projector_weights, pixels):
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        w = projector_weights
        x = torch.nn.functional.gelu(hidden @ w["model.mm_projector.0.weight"].T + w["model.mm_projector.0.bias"])
        return x @ w["model.mm_projector.2.weight"].T + w["model.mm_projector.2.bias"]


@pytest.mark.parametrize("kind", ["lora", "merged"])
def test_original_layout_converts_to_llava_hf(kind, lora_checkpoint, merged_checkpoint, tower_dir, projector_weights, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from prumerge.export.convert import convert_llava_original

    if kind == "lora":
        facts = convert_llava_original(lora_checkpoint["adapter"], tmp_path / "hf", base=lora_checkpoint["base"])
        reference = lora_checkpoint["reference"]
        assert facts["lora"] and facts["lora_targets"] == 6  # q, v, down x 2 layers
    else:
        facts = convert_llava_original(merged_checkpoint["dir"], tmp_path / "hf")
        reference = merged_checkpoint["reference"]
    model, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.convert_ids_to_tokens(facts["image_token_id"]) == "<image>"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    ids = torch.tensor([[1, 17, 42, 99, 5, 260]])
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    assert torch.allclose(ours[..., :TINY_VOCAB], expected, atol=1e-5), float((ours[..., :TINY_VOCAB] - expected).abs().max())

    pixels = torch.from_numpy(synthetic_pixels(2, 112))
    encoder = PruMergeEncoder.from_pretrained(tmp_path / "hf", method="none")
    with torch.no_grad():
        tokens = encoder(pixels).tokens
    assert torch.allclose(tokens, _projected_reference(tower_dir, projector_weights, pixels), atol=1e-5)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["do_pad"] is True  # image_aspect_ratio "pad", as LLaVA-1.5

    # the vision side alone (what verify reads): the same tokens, no language-model weights or tokenizer written
    source = lora_checkpoint["adapter"] if kind == "lora" else merged_checkpoint["dir"]
    convert_llava_original(source, tmp_path / "vision", base=lora_checkpoint["base"] if kind == "lora" else None,
                           vision_only=True)
    written = {k for f in (tmp_path / "vision").glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}
    assert written and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in written)
    assert not (tmp_path / "vision" / "tokenizer_config.json").exists()
    with torch.no_grad():
        alone = PruMergeEncoder.from_pretrained(tmp_path / "vision", method="none")(pixels).tokens
    assert torch.equal(alone, tokens)


def test_build_takes_an_original_layout_lora_checkpoint_directly(lora_checkpoint, tmp_path, monkeypatch):
    """Built directly from the adapter; verified against a PyTorch reference rebuilt from the vision side alone
    (verify writes no language model: a 7B one would be 13 GB written to read a 0.3B tower back)."""
    import prumerge.export.convert as convert
    from prumerge.export.verify import verify_artifact

    out = tmp_path / "art"
    manifest = build_artifact(str(lora_checkpoint["adapter"]), out,
                              BuildOptions(llm=None, source=SourceOptions(base=str(lora_checkpoint["base"]))))
    assert manifest.source.layout == "llava-original" and manifest.source.model == str(lora_checkpoint["adapter"])
    assert manifest.llm.image_token_id is not None and manifest.vision.projected
    assert not list(tmp_path.glob(".art.convert-*")), "the temporary conversion is removed"
    monkeypatch.setattr(convert, "_write_language_model", lambda *a, **k: pytest.fail("verify wrote the language model"))
    assert verify_artifact(out, images=2)["reference"]["ok"]
    # inspect draws with the same encoder (read from the manifest: the adapter, its base and tower)
    from click.testing import CliRunner
    from PIL import Image

    from prumerge.cli import main

    Image.new("RGB", (120, 90), (200, 30, 30)).save(tmp_path / "red.png")
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "red.png"), "--model", str(out), "--out", str(tmp_path / "i.png")])
    assert shown.exit_code == 0 and "kept patches by attention" in shown.output, shown.output


def test_conversion_refusals(lora_checkpoint, tmp_path):
    from prumerge.export.convert import convert_llava_original

    with pytest.raises(CheckpointError, match="pass --base"):
        convert_llava_original(lora_checkpoint["adapter"], tmp_path / "a")
    bad = tmp_path / "bad"
    shutil.copytree(lora_checkpoint["adapter"], bad)

    class Payload:  # a pickle that would run code if unpickled
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"base_model.model.model.mm_projector.0.weight": Payload()}, bad / "non_lora_trainables.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_llava_original(bad, tmp_path / "b", base=lora_checkpoint["base"])
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"mm_projector_type": "linear"}))
    with pytest.raises(CheckpointError, match="mm_projector_type 'linear'"):
        convert_llava_original(bad, tmp_path / "c", base=lora_checkpoint["base"])


def test_a_relative_tower_path_resolves_against_the_checkpoint_never_the_working_directory(
        merged_checkpoint, tower_dir, tmp_path, monkeypatch):
    """`mm_vision_tower: "../clip"` loaded `evil/clip` from the working directory; it is the checkpoint's neighbour."""
    from transformers import CLIPVisionModel

    from prumerge.export.convert import convert_llava_original

    root = tmp_path / "models"
    checkpoint = root / "llava"
    shutil.copytree(merged_checkpoint["dir"], checkpoint)
    shutil.copytree(tower_dir, root / "clip")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"mm_vision_tower": "../clip"}))
    evil = tmp_path / "cwd"
    torch.manual_seed(99)
    CLIPVisionModel(tiny_vision_config()).save_pretrained(evil / "clip")  # another tower where ../clip would land from cwd
    (evil / "sub").mkdir()
    monkeypatch.chdir(evil / "sub")
    facts = convert_llava_original(checkpoint, tmp_path / "hf")
    assert facts["vision_tower"] == str((root / "clip").resolve())
    (checkpoint / "config.json").write_text(json.dumps(config | {"mm_vision_tower": "clip"}))
    monkeypatch.chdir(evil)  # `clip` exists only in the working directory: refused, not loaded
    with pytest.raises(CheckpointError, match="not inside the checkpoint directory"):
        convert_llava_original(checkpoint, tmp_path / "hf2")


def test_convert_command(lora_checkpoint, tmp_path):
    from click.testing import CliRunner

    from prumerge.cli import main

    result = CliRunner().invoke(main, ["convert", str(lora_checkpoint["adapter"]), "--out", str(tmp_path / "hf"),
                                       "--base", str(lora_checkpoint["base"])])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["lora"] is True
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    result = CliRunner().invoke(main, ["convert", str(lora_checkpoint["adapter"]), "--out", str(tmp_path / "hf2")])
    assert result.exit_code == 4 and "pass --base" in result.output
