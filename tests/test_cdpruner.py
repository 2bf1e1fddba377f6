"""CDPruner: the kept set is the released code's, step for step, in PyTorch and in the exported graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prumerge.errors import ConfigError, InputError
from prumerge.reduce.config import ReducerConfig
from prumerge.reduce.methods.cdpruner import cdpruner_indices, dpp_greedy


def released_selection(image_features, image_embeds, text_embeds, visual_token_num):
    """The selection of CDPruner's released ``encode_images`` (github.com/Theia-4869/CDPruner,
    ``llava/model/llava_arch.py``, commit ed9c12d), copied with the projector call removed (``image_features`` are
    given projected) and the index mask returned as the sorted indices it is made from."""
    B, N, C = image_features.shape
    device = image_features.device
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N), device=device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    return torch.sort(select_idx.t()).values


@pytest.mark.parametrize("seed,tokens,width,rows,keep", [(0, 64, 32, 5, 8), (1, 144, 48, 1, 20), (2, 256, 64, 12, 64),
                                                          (3, 49, 96, 3, 30)])
def test_matches_the_released_selection_at_batch_one(seed, tokens, width, rows, keep):
    """With the released sign, the LLM-embedding relevance is the released rule with the projected tokens as image
    embeddings and the question's rows as text embeddings: identical indices at batch 1 (how the released code
    evaluates)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(1, tokens, width, generator=g) + 0.5 * torch.randn(1, 1, width, generator=g)
    question = torch.randn(1, rows, width, generator=g)
    got, _ = cdpruner_indices(features, question, torch.ones(1, rows), keep, sign="negated")
    assert got.tolist() == released_selection(features, features, question[0], keep).tolist()


def test_batch_scope_is_the_released_batch_rule_and_image_scope_is_per_image():
    g = torch.Generator().manual_seed(7)
    features = torch.randn(3, 81, 40, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1)
    question = torch.randn(1, 4, 40, generator=g)
    shared = question.expand(3, -1, -1)
    batch, _ = cdpruner_indices(features, shared, torch.ones(3, 4), 16, scope="batch", sign="negated")
    assert batch.tolist() == released_selection(features, features, question[0], 16).tolist()
    per_image, _ = cdpruner_indices(features, shared, torch.ones(3, 4), 16, scope="image", sign="negated")
    for b in range(3):
        assert per_image[b].tolist() == released_selection(features[b:b + 1], features[b:b + 1], question[0], 16)[0].tolist()


def test_padding_rows_of_the_question_change_nothing():
    g = torch.Generator().manual_seed(3)
    features, question = torch.randn(1, 64, 24, generator=g), torch.randn(1, 3, 24, generator=g)
    padded = torch.cat([question, 100 * torch.randn(1, 2, 24, generator=g)], dim=1)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(cdpruner_indices(features, question, torch.ones(1, 3), 12)[0],
                       cdpruner_indices(features, padded, mask, 12)[0])


def test_an_exhausted_kernel_still_picks_distinct_tokens():
    """More steps than the kernel's rank: the released code takes sqrt of a non-positive pivot (NaN); here every
    pick stays a distinct token."""
    g = torch.Generator().manual_seed(5)
    features = torch.randn(1, 40, 4, generator=g)  # rank 4
    picks = dpp_greedy(torch.matmul(features, features.transpose(1, 2)), 12)
    assert len(set(picks[0].tolist())) == 12


def test_options_are_checked_from_their_declaration():
    with pytest.raises(ConfigError, match="kept_tokens must be an integer >= 1"):
        ReducerConfig(method="cdpruner", kept_tokens=0)
    with pytest.raises(ConfigError, match="unknown relevance_scope"):
        ReducerConfig(method="cdpruner", relevance_scope="global")
    assert ReducerConfig(method="cdpruner", kept_tokens=34).fixed_count == 34


# ------------------------------------------------------------------------------------------------ in the graph
def test_the_graph_keeps_what_pytorch_keeps_for_each_question_and_verify_passes(cdpruner_artifact):
    """The build validated the graph against PyTorch (indices identical) with a question input of its own; verify
    does it again; another question keeps another set, and the same question the same set."""
    from prumerge.artifact.contract import QUESTION_INPUTS, probe_question
    from prumerge.artifact.manifest import Manifest
    from prumerge.export.verify import verify_artifact
    from prumerge.runtime.vision import VisionSession

    manifest = Manifest.read(cdpruner_artifact)
    assert manifest.vision.validation.indices_identical and manifest.vision.method == "cdpruner"
    assert tuple(s.name for s in manifest.vision.inputs[1:]) == QUESTION_INPUTS
    assert verify_artifact(cdpruner_artifact, images=2)["reference"]["indices_identical"]
    session = VisionSession.open(cdpruner_artifact)
    pixels = np.random.default_rng(0).standard_normal((1, 3, session.image_size, session.image_size)).astype(np.float32)
    kept = {seed: tuple(session.run_pixels(pixels, probe_question(1, session.question_width, 4, seed)).indices[0])
            for seed in range(4)}
    assert len(set(kept.values())) > 1  # the question decides
    assert kept[0] == tuple(session.run_pixels(pixels, probe_question(1, session.question_width, 4, 0)).indices[0])
    with pytest.raises(InputError, match="reads the question"):
        session.run_pixels(pixels)


def test_the_pipeline_embeds_the_question_and_answers(cdpruner_artifact):
    from prumerge.runtime.pipeline import Pipeline, SamplingParams

    pipeline = Pipeline.from_artifacts(cdpruner_artifact)
    image = np.full((40, 40, 3), 128, dtype=np.uint8)
    result = pipeline.generate(image, "<image>\nWhat colour is the square?", sampling=SamplingParams(3))
    assert result.visual_tokens == [9] and result.generated_tokens >= 1
    question = pipeline.question("<image>\nWhat colour?", 2)
    assert question["question_embeds"].shape[0] == 2 and question["question_mask"].all()
    with pytest.raises(InputError, match="no words besides its image markers"):
        pipeline.generate(image, "<image>", sampling=SamplingParams(2))


def test_a_second_question_on_an_image_runs_the_reducer_graph_alone(cdpruner_artifact):
    """The build writes the reducer alone (checked there against the whole graph); the pipeline keeps an image's
    patch outputs, so a second question on it runs the reducer graph only (the tower graph runs once) and answers
    exactly as a pipeline that runs the whole graph for it."""
    from prumerge.artifact.manifest import Manifest
    from prumerge.runtime.pipeline import Pipeline, SamplingParams

    manifest = Manifest.read(cdpruner_artifact)
    assert manifest.vision.reducer_graph == "vision_reducer.onnx" and "vision_reducer.onnx" in manifest.files
    assert "patch_tokens" in [o.name for o in manifest.vision.outputs]
    image = np.full((40, 40, 3), 70, dtype=np.uint8)
    image[5:20, 8:30] = (200, 40, 40)
    questions = ("<image>\nWhat colour is the square?", "<image>\ndescribe the image in detail")
    pipeline = Pipeline.from_artifacts(cdpruner_artifact)
    calls = {"tower": 0, "reducer": 0}
    for part, session in (("tower", pipeline.vision.session), ("reducer", pipeline.vision.reducer)):
        run = session.run
        session.run = lambda *a, _run=run, _part=part, **k: (calls.__setitem__(_part, calls[_part] + 1), _run(*a, **k))[1]
    answers = [pipeline.generate(image, q, sampling=SamplingParams(4)) for q in questions]
    assert calls == {"tower": 1, "reducer": 1}
    for question, answer in zip(questions, answers):
        fresh = Pipeline.from_artifacts(cdpruner_artifact)
        fresh.vision.reducer = None  # the whole graph for every question
        alone = fresh.generate(image, question, sampling=SamplingParams(4))
        assert (answer.token_ids, answer.visual_tokens) == (alone.token_ids, alone.visual_tokens)
    pixels = np.random.default_rng(1).standard_normal((2, 3, 112, 112)).astype(np.float32)
    first, patches = pipeline.vision.run_keeping_patches(pixels, pipeline.question(questions[0], 2))
    other = pipeline.question(questions[1], 2)
    assert np.array_equal(pipeline.vision.reduce_patches(patches, other).indices,
                          pipeline.vision.run_pixels(pixels, other).indices)


def test_what_cannot_be_built_with_a_question_is_refused_in_one_line(llava_dir, tmp_path):
    from click.testing import CliRunner

    from prumerge.cli import main

    for flags, message in ((["--no-llm"], "--no-llm"), (["--no-project"], "needs the checkpoint's projector"),
                           (["--target", "server", "--max-question-rows", "5000"], "question rows profile")):
        result = CliRunner().invoke(main, ["build", str(llava_dir), "--out", str(tmp_path / "x"), "--method", "cdpruner",
                                           *flags])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "x").exists()


def test_inspect_draws_the_relevance_and_kept_set_and_profile_attributes_the_reducer(cdpruner_artifact, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from prumerge.artifact.node_stages import classify_nodes
    from prumerge.cli import main

    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    args = ["inspect", str(image), "--model", str(cdpruner_artifact), "--method", "cdpruner", "--out", str(tmp_path / "i.png")]
    result = CliRunner().invoke(main, [*args, "--question", "What colour is the star?"])
    assert result.exit_code == 0, result.output
    assert "cdpruner: 9 tokens of" in result.output and (tmp_path / "i.png").is_file()
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "give the question" in refused.output
    stages = classify_nodes(cdpruner_artifact / "vision.onnx")
    assert list(stages.values()).count("reducer") > 20 and "projector" in stages.values()


def test_the_positive_sign_is_the_released_rule_on_negated_embeddings():
    """``positive`` differs from the released rule only by the sign of the cosine: the released code run on the
    negated question gives the same set."""
    g = torch.Generator().manual_seed(11)
    features, question = torch.randn(1, 100, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    got, _ = cdpruner_indices(features, question, torch.ones(1, 4), 24, sign="positive")
    assert got.tolist() == released_selection(features, features, -question[0], 24).tolist()


def test_a_manifest_whose_question_inputs_are_renamed_or_dropped_is_refused(cdpruner_artifact, tmp_path):
    """The runtime reads what the graph needs from the manifest's inputs: an edited list (the question dropped, or
    an input prumerge does not know) is refused when read, before a session would run the graph without it."""
    import shutil

    from conftest import rehash_manifest
    from prumerge.artifact.manifest import Manifest
    from prumerge.errors import ArtifactError

    for name, edit in (("dropped", lambda d: d["vision"]["inputs"].pop()),
                       ("renamed", lambda d: d["vision"]["inputs"][1].update(name="secret_input"))):
        art = tmp_path / name
        shutil.copytree(cdpruner_artifact, art)
        rehash_manifest(art, edit)
        with pytest.raises(ArtifactError, match="inputs must be pixel_values"):
            Manifest.read(art)


def test_a_manifest_whose_reducer_graph_or_text_side_is_edited_is_refused(cdpruner_artifact, clip_text_artifact,
                                                                          tmp_path):
    """The reducer graph and the text graph are read from where the manifest says, inside the artifact only; a
    reducer graph on a graph that reads no question, or a text width the vision graph does not take, is refused."""
    import shutil

    from conftest import rehash_manifest
    from prumerge.artifact.manifest import Manifest
    from prumerge.errors import ArtifactError
    from prumerge.runtime.vision import VisionSession

    from prumerge.runtime.pipeline import Pipeline

    vision = lambda art: VisionSession.open(art, verify=False)  # noqa: E731
    pipeline = lambda art: Pipeline.from_artifacts(art, verify=False)  # noqa: E731
    cases = ((cdpruner_artifact, lambda d: d["vision"].update(reducer_graph="../../outside.onnx"), "outside", vision),
             (cdpruner_artifact, lambda d: d["vision"].update(inputs=d["vision"]["inputs"][:1]), "reducer_graph",
              Manifest.read),
             (clip_text_artifact, lambda d: d["text"].update(width=d["text"]["width"] + 1), "text.width", Manifest.read),
             (clip_text_artifact, lambda d: d["text"].update(directory="../.."), "outside", pipeline))
    for i, (source, edit, message, read) in enumerate(cases):
        art = tmp_path / str(i)
        shutil.copytree(source, art)
        rehash_manifest(art, edit)
        with pytest.raises(ArtifactError, match=message):
            read(art)


def test_validation_allows_a_set_only_where_the_reference_greedy_step_was_a_near_tie():
    """Two tokens with the same direction and relevance tie exactly at the first step: a runtime that took the other
    one kept a set the reference may take; a set that swaps a token no step was close about is refused."""
    from prumerge.reduce.methods.cdpruner import moved_within_ties

    g = torch.Generator().manual_seed(2)
    features = torch.randn(1, 30, 16, generator=g)
    features[0, 7] = features[0, 3]  # identical tokens: identical kernel rows, an exact tie wherever one is picked
    question, mask = torch.randn(1, 3, 16, generator=g), torch.ones(1, 3)
    config = ReducerConfig(method="cdpruner", kept_tokens=6)
    reference, _ = cdpruner_indices(features, question, mask, 6)
    kept = set(reference[0].tolist())
    assert moved_within_ties(features, question, mask, config, reference) == [True]
    if kept & {3, 7}:  # the tied pair was reached: the other twin is as good
        twin = (kept - {3, 7}) | ({7} if 3 in kept else {3})
        assert moved_within_ties(features, question, mask, config, torch.tensor([sorted(twin)])) == [True]
    far = sorted((kept - {max(kept - {3, 7})}) | {next(i for i in range(30) if i not in kept | {3, 7})})
    assert moved_within_ties(features, question, mask, config, torch.tensor([far])) == [False]


def test_int8_and_the_int8_kv_cache_calibrate_with_the_probe_question_and_keep_the_reducer_float(llava_dir, tmp_path):
    """Static INT8 of a question-reading graph: calibrated on the images with the contract's probe question (the
    tower's and projector's activations do not depend on it), no reducer node reads a quantised tensor, the agreement
    with fp32 is recorded; the int8 KV cache calibrates on its prompts likewise; verify compares it with PyTorch."""
    from conftest import quantised_reducer_check
    from prumerge.calib.budget import calibrate_budget
    from prumerge.calib.images import CalibrationSet
    from prumerge.export.build import build_artifact
    from prumerge.export.options import BuildOptions, Int8Options, LlmOptions
    from prumerge.export.verify import verify_artifact

    calibration = calibrate_budget(str(llava_dir), CalibrationSet.synthetic(6, 0), ["prumerge"], 0.9).write(tmp_path / "c.json")
    manifest = build_artifact(str(llava_dir), tmp_path / "int8", BuildOptions(
        ReducerConfig(method="cdpruner", kept_tokens=9), llm=LlmOptions(precision="fp32", kv_cache="int8"),
        int8=Int8Options(), calibration=str(calibration)))
    assert manifest.vision.precision == "int8" and manifest.llm.kv_dtype == "int8"
    agreement = manifest.vision.int8.agreement
    assert agreement.images == 6 and 0 < agreement.mean_jaccard <= 1 and agreement.mean_count_diff == 0
    reducer_nodes, quantise_nodes = quantised_reducer_check(tmp_path / "int8" / "vision.onnx")
    assert reducer_nodes > 20 and quantise_nodes > 5
    assert "reference_int8_agreement" in verify_artifact(tmp_path / "int8", images=2)


def test_a_tensorrt_engine_for_a_question_graph_profiles_the_question_rows_and_refuses_longer_ones(cdpruner_artifact):
    """The engine's optimization profile covers the question inputs' token axis (1 / opt / max question rows) beside
    the batch; build_engine.sh passes the same bounds to ``prumerge-export engine``; a session bound by an engine's
    profile refuses a longer question in one line (TensorRT itself would fail mid-run)."""
    from prumerge.artifact.contract import probe_question
    from prumerge.artifact.manifest import Manifest
    from prumerge.export.tensorrt import EngineOptions, build_script, optimization_profile, trtexec_command
    from prumerge.runtime.vision import VisionSession

    inputs = Manifest.read(cdpruner_artifact).vision.inputs
    options = EngineOptions.for_target("server", max_batch=4, opt_question_rows=16, max_question_rows=64)
    profile = optimization_profile(inputs, options)
    width = inputs[1].shape[2]
    assert profile["question_embeds"] == ((1, 1, width), (1, 16, width), (4, 64, width))
    assert profile["question_mask"] == ((1, 1), (1, 16), (4, 64))
    assert profile["pixel_values"][2][0] == 4
    command = trtexec_command("vision.onnx", "vision.engine", inputs, options)
    assert f"question_embeds:4x64x{width}" in next(c for c in command if c.startswith("--maxShapes="))
    assert "--opt-question-rows 16 --max-question-rows 64" in build_script(inputs, options)
    assert "question-rows" not in build_script(inputs[:1], options)  # a pixels-only graph has no such axis

    session = VisionSession.open(cdpruner_artifact)
    pixels = np.zeros((1, 3, session.image_size, session.image_size), np.float32)
    session.question_rows_max = 5  # as a TensorRTSession sets it from its engine's profile
    session.run_pixels(pixels, probe_question(1, session.question_width, 5))
    with pytest.raises(InputError, match="6 tokens long; this .* built for at most 5"):
        session.run_pixels(pixels, probe_question(1, session.question_width, 6))


# ------------------------------------------------------------------------------------------------ CLIP's text side
def released_text_embeds(tokenizer, text_tower, texts):
    """The released text path (CDPruner ``llava/model/multimodal_encoder/clip_encoder.py`` ``forward``, commit
    ed9c12d): the instruction tokenised once, zero-padded to whole ``max_position_embeddings`` segments, one CLIP
    text embedding per segment (the CUDA streams dropped)."""
    max_position_embeddings = text_tower.config.max_position_embeddings
    text_inputs = tokenizer(text=texts, return_tensors="pt")
    text_segment = (text_inputs.input_ids.shape[1] - 1) // max_position_embeddings + 1
    text_padding = max_position_embeddings * text_segment - text_inputs.input_ids.shape[1]
    text_inputs = {
        k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1).reshape(-1, max_position_embeddings)
        for k, v in text_inputs.items() if k in ("input_ids", "attention_mask")
    }
    return text_tower(**text_inputs).text_embeds


@pytest.fixture(scope="module")
def clip_text_artifact(llava_dir, llava_clip_dir, tmp_path_factory):
    """The tiny LLaVA with CDPruner reading the question through its CLIP's text side, with its fp32 LLM."""
    from click.testing import CliRunner

    from prumerge.cli import main

    out = tmp_path_factory.mktemp("cdpruner-text") / "art"
    result = CliRunner().invoke(main, ["build", str(llava_dir), "--out", str(out), "--method", "cdpruner",
                                       "--kept-tokens", "9", "--text-encoder", str(llava_clip_dir), "--llm-precision", "fp32",
                                       "--llm-kv-cache", "float"])
    assert result.exit_code == 0, result.output
    return out


QUESTIONS = ("what is in this picture", "there are two birds and a tree " * 6, "red green blue yellow")


def test_the_clip_text_relevance_keeps_what_the_released_code_keeps(clip_text_artifact, llava_dir, llava_clip_dir):
    """``--text-encoder``: the device embeds the question with the artifact's text graph and CLIP tokenizer
    (tokenizers + onnxruntime) as the released code does with transformers (segments of 16 positions here; the
    second question spans several), and the vision graph keeps exactly the released selection: relevance from CLIP
    image embeddings of the feature layer's patches (post_layernorm, visual_projection), negated (the released
    sign, the default with a text encoder), the DPP over the projected tokens."""
    from transformers import (AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection,
                              LlavaForConditionalGeneration)

    from prumerge.artifact.manifest import Manifest
    from prumerge.runtime.text import TextEncoder
    from prumerge.runtime.vision import VisionSession

    manifest = Manifest.read(clip_text_artifact)
    assert manifest.reducer.options["relevance_sign"] == "negated" and manifest.text.width == 24
    assert manifest.vision.inputs[1].shape[-1] == 24 and manifest.text.validation["max_relative_error"] <= 1e-4
    assert {"text/text.onnx", "text/tokenizer.json"} <= set(manifest.files)
    manifest.verify_files(clip_text_artifact)
    session, text = VisionSession.open(clip_text_artifact), TextEncoder(clip_text_artifact, manifest.text)

    tokenizer = AutoTokenizer.from_pretrained(llava_clip_dir)
    text_tower = CLIPTextModelWithProjection.from_pretrained(llava_clip_dir).eval()
    image_tower = CLIPVisionModelWithProjection.from_pretrained(llava_clip_dir).eval()
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    pixels = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 3, 112, 112)).astype(np.float32))
    with torch.no_grad():
        outputs = image_tower(pixels, output_hidden_states=True)
        patches = outputs.hidden_states[llava.config.vision_feature_layer][:, 1:]
        image_embeds = image_tower.visual_projection(image_tower.vision_model.post_layernorm(patches))
        projected = llava.model.multi_modal_projector(patches)
    segments_seen = set()
    for question in QUESTIONS:
        with torch.no_grad():
            want = released_text_embeds(tokenizer, text_tower, [question])
        got = text.embed(question)
        segments_seen.add(len(got))
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
        kept = session.run_pixels(pixels.numpy(), {"question_embeds": np.broadcast_to(got, (2, *got.shape)),
                                                   "question_mask": np.ones((2, len(got)), np.float32)}).indices
        for b in range(2):  # the released code evaluates at batch 1
            released = released_selection(projected[b: b + 1], image_embeds[b: b + 1], want, 9)
            assert kept[b].tolist() == released[0].tolist(), question
    assert len(segments_seen) > 1  # one question was cut into several segments


def test_the_pipeline_embeds_the_question_with_the_text_graph_and_answers(clip_text_artifact):
    from prumerge.runtime.pipeline import Pipeline, SamplingParams

    pipeline = Pipeline.from_artifacts(clip_text_artifact)
    question = pipeline.question("<image>\n" + QUESTIONS[1], 2)
    np.testing.assert_array_equal(question["question_embeds"][1], pipeline.text.embed(QUESTIONS[1].strip()))
    assert question["question_embeds"].shape[1:] == (len(pipeline.text.embed(QUESTIONS[1])), 24)
    result = pipeline.generate(np.full((40, 40, 3), 90, np.uint8), "<image>\nWhat colour?", sampling=SamplingParams(3))
    assert result.visual_tokens == [9] and result.generated_tokens >= 1
    with pytest.raises(InputError, match="CLIP tokens long"):
        pipeline.question("word " * (pipeline.text.spec.max_segments * pipeline.text.spec.positions), 1)


def test_a_text_encoder_that_is_not_the_towers_clip_or_not_for_cdpruner_is_refused(llava_dir, llava_clip_dir,
                                                                                    clip_dir, tmp_path):
    import shutil

    from click.testing import CliRunner
    from transformers import CLIPModel

    from prumerge.cli import main

    other = tmp_path / "other-clip"
    clip = CLIPModel.from_pretrained(llava_clip_dir)
    with torch.no_grad():
        clip.vision_model.encoder.layers[0].mlp.fc1.weight.add_(0.01)
    clip.save_pretrained(other)
    shutil.copyfile(llava_clip_dir / "tokenizer.json", other / "tokenizer.json")
    for flags, message in (([str(other)], "not this checkpoint's tower"), ([str(clip_dir)], "not a full CLIP"),
                           ([str(llava_clip_dir), "--method", "divprune"], "not for --method divprune")):
        result = CliRunner().invoke(main, ["build", str(llava_dir), "--out", str(tmp_path / "x"), "--method", "cdpruner",
                                           "--no-llm", "--text-encoder", *flags])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "x").exists()
