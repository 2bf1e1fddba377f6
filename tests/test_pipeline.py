"""The LLM side: greedy parity with transformers, KV cache = full recompute, prompt errors, streaming, SmolLM2 int4."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from prumerge import PruMergeEncoder
from prumerge.errors import ArtifactError, ConfigError, InputError
from prumerge.export.validate import synthetic_pixels
from prumerge.runtime import Pipeline
from prumerge.runtime.pipeline import chunk_starts, place_images
from prumerge.runtime.preprocess import preprocess_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm_artifact(artifact_factory):
    return artifact_factory("llava", "prumerge", "padded", llm_precision="fp32", baseline=True)


@pytest.fixture(scope="module")
def hf_llava(llava_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()


def images(n, seed=0):
    return [(np.clip(synthetic_pixels(1, 112, seed=seed + i)[0].transpose(1, 2, 0) * 60 + 128, 0, 255)).astype(np.uint8)
            for i in range(n)]


def reference_tokens(pipeline, hf, encoder, imgs, prompt, max_new_tokens):
    """transformers' greedy generate on the same ids and the same reduced (PyTorch) image features."""
    text = pipeline.spec.prompt_format.format(prompt=prompt)
    pieces = text.split("<image>")
    embed = hf.get_input_embeddings()
    parts = []
    with torch.no_grad():
        visual = []
        if imgs:
            out = encoder(torch.from_numpy(preprocess_batch(imgs, pipeline.vision.preprocess)))
            visual = [out.tokens[b, : int(out.num_tokens[b])] for b in range(len(imgs))]
        for i, piece in enumerate(pieces):
            ids = pipeline.tokenizer.encode(piece, add_special_tokens=False).ids
            if ids:
                parts.append(embed(torch.tensor(ids)))
            if i < len(visual):
                parts.append(visual[i])
        embeds = torch.cat(parts).unsqueeze(0)
        generated = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return generated[0].tolist()


PROMPTS = [([], "describe the image in detail"), ([0], "<image>\nwhat is in this picture"),
           ([1], "a photo <image> of a cat"), ([2, 3], "<image> and <image>: red green blue")]


@pytest.mark.parametrize("which,prompt", PROMPTS, ids=["text", "image", "inline", "two-images"])
def test_greedy_matches_transformers(llm_artifact, hf_llava, llava_dir, which, prompt):
    pipeline = Pipeline.from_artifacts(llm_artifact)
    encoder = PruMergeEncoder.from_pretrained(llava_dir, method="prumerge")
    imgs = [images(4)[i] for i in which]
    result = pipeline.generate(imgs, prompt, max_new_tokens=12)
    expected = reference_tokens(pipeline, hf_llava, encoder, imgs, prompt, 12)
    n = len(result.token_ids)
    assert result.token_ids == expected[:n]
    if result.stop_reason != "eos":
        assert n == 12
    assert len(result.visual_tokens) == len(imgs)


def _steps_match(decoder, cache, embeds, full):
    """Prefill ``embeds[:12]`` into ``cache``, then one position per step: each step's logits within 1e-4 of
    ``full`` (the reference logits of every position); returns the cache."""
    logits, cache = decoder.step(embeds[:12], cache)
    np.testing.assert_allclose(logits, full[11], atol=1e-4)
    for t in range(12, len(embeds)):
        logits, cache = decoder.step(embeds[t : t + 1], cache)
        np.testing.assert_allclose(logits, full[t], atol=1e-4)
    return cache


def test_kv_cache_decode_equals_full_recompute(llm_artifact):
    pipeline = Pipeline.from_artifacts(llm_artifact)
    decoder = pipeline.decoder
    rng = np.random.default_rng(0)
    embeds = rng.normal(0, 1, (20, decoder.embeddings.shape[1])).astype(np.float32)
    # the reference: each position's logits from a fresh prefill of everything up to it (the decoder computes the
    # last position's logits only, so "all logits of one run" is not available by design)
    assert decoder.spec.logits == "last"
    with pytest.raises(InputError, match="last position's logits only"):
        decoder.step(embeds, decoder.start(), all_logits=True)
    full = np.stack([decoder.step(embeds[: t + 1], decoder.start())[0] for t in range(20)])
    cache = _steps_match(decoder, decoder.start(), embeds, full)
    assert cache.length == 20
    # the shared, preallocated buffer (GroupQueryAttention writes in place) gives the same logits, bit for bit
    assert decoder.spec.kv_share_buffer, "the builder's GQA decoder shares past and present"
    shared = decoder.start(capacity=24)
    assert shared.capacity == 24
    shared = _steps_match(decoder, shared, embeds, full)
    with pytest.raises(InputError, match="allocated for 24"):
        decoder.step(np.zeros((5, embeds.shape[1]), np.float32), shared)


def decode_rows(decoder, prompt, capacity, tokens=None):
    """Each step's logits [9, V] after ``prompt`` and the tokens fed: the given ones (teacher forcing), else greedy."""
    cache = decoder.start(capacity=capacity)
    logits, cache = decoder.step(prompt, cache)
    rows, fed = [logits], []
    for step in range(8):
        fed.append(tokens[step] if tokens else int(np.argmax(logits)))
        logits, cache = decoder.step(decoder.embed([fed[-1]]), cache)
        rows.append(logits)
    return np.stack(rows), fed


def test_an_int8_kv_cache_is_calibrated_written_and_decodes_like_the_float_one(llm_artifact, artifact_factory):
    """``--llm-kv-cache int8``: the same builder output with an int8 cache whose per-channel scales come from
    prompts holding the artifact's own visual tokens (its calibration images through its vision graph). The graph
    is the builder's int8_per_channel form; shared-buffer steps equal concatenation bit for bit; every step's
    logits stay within 2 % of the logits' range of the float cache's (measured on this tiny model: 0.3 %; scales
    10x too small, which clip, give 24 %), and the greedy tokens are the same."""
    import onnx

    from prumerge.export.build import KV_CALIBRATION_IMAGES
    from prumerge.export.kv_cache import GENERATED_TOKENS
    from prumerge.runtime.llm import Stopwatch

    artifact = artifact_factory("llava", "prumerge", "padded", llm_precision="fp32", llm_kv_cache="int8")
    quantised, reference = Pipeline.from_artifacts(artifact).decoder, Pipeline.from_artifacts(llm_artifact).decoder
    spec = quantised.spec
    assert spec.kv_dtype == "int8" and quantised.kv_dtype == np.int8
    calibration = spec.kv_cache["calibration"]
    assert calibration["prompts"] == KV_CALIBRATION_IMAGES == calibration["images"]["used"]
    # every prompt's positions: its image's visual tokens, the question, then the generated text
    assert calibration["positions"] >= calibration["visual_tokens"] + KV_CALIBRATION_IMAGES * (GENERATED_TOKENS - 1)
    assert calibration["visual_tokens"] >= KV_CALIBRATION_IMAGES
    graph = onnx.load(str(artifact / spec.directory / spec.decoder), load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == spec.num_layers
    for layer, node in enumerate(attention):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["k_quant_type"], attrs["v_quant_type"], attrs["kv_cache_bit_width"]) == (b"PER_CHANNEL", b"PER_CHANNEL", 8)
        assert list(node.input[12:]) == [f"model.layers.{layer}.attn.k_scale", f"model.layers.{layer}.attn.v_scale"]
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(("k_scale", "v_scale"))}
    assert len(scales) == 2 * spec.num_layers
    assert all(s.shape == (spec.num_kv_heads * spec.head_size,) and (s > 0).all() for s in scales.values())
    assert {i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_")} == {onnx.TensorProto.INT8}

    pipeline = Pipeline.from_artifacts(llm_artifact)
    prompt, _ = pipeline.build_prompt(images(1, seed=11), "<image>\nwhat is in this picture", True, Stopwatch())

    reference_rows, greedy = decode_rows(reference, prompt, len(prompt) + 9)
    grown, _ = decode_rows(quantised, prompt, None, greedy)
    shared, _ = decode_rows(quantised, prompt, len(prompt) + 9, greedy)
    np.testing.assert_array_equal(shared, grown)
    span = float(reference_rows.max() - reference_rows.min())
    print(f"int8 KV cache: max |logit difference| {float(np.abs(shared - reference_rows).max()) / span:.4f} of the range")
    assert float(np.abs(shared - reference_rows).max()) <= 0.02 * span
    assert [int(np.argmax(r)) for r in shared[:-1]] == greedy


def test_a_mixed_kv_cache_prefills_in_float_and_decodes_from_the_int8_cache(llm_artifact, artifact_factory):
    """``--llm-kv-cache mixed`` (the default on the CPU provider): one decoder whose attention is an ``If`` per
    layer. A first step runs float attention, so its logits are the float decoder's (same kernel, same inputs), and
    the cache it leaves is the float presents quantised with the layer's calibrated scales, ``round(x / scale)``
    clipped to int8, in both the shared-buffer and the growing form; later steps read that int8 cache (shared buffers
    equal concatenation bit for bit, logits within 2 % of the float decoder's range, the same greedy tokens)."""
    import onnx

    from prumerge.runtime.llm import Stopwatch, check_decoder_io

    artifact = artifact_factory("llava", "prumerge", "padded", llm_precision="fp32", llm_kv_cache="mixed")
    mixed, reference = Pipeline.from_artifacts(artifact).decoder, Pipeline.from_artifacts(llm_artifact).decoder
    spec = mixed.spec
    assert (spec.kv_cache_kind, spec.kv_dtype, reference.spec.kv_cache_kind) == ("mixed", "int8", "float")
    path = artifact / spec.directory / spec.decoder
    graph = onnx.load(str(path), load_external_data=False).graph
    switch = spec.kv_cache["prefill_switch"]
    assert [i.type.tensor_type.elem_type for i in graph.input if i.name == switch] == [onnx.TensorProto.BOOL]
    assert not [n for n in graph.node if n.op_type == "GroupQueryAttention"]  # every layer's is inside its If
    assert len([n for n in graph.node if n.op_type == "If" and n.input[0] == switch]) == spec.num_layers
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(("k_scale", "v_scale"))}

    pipeline = Pipeline.from_artifacts(llm_artifact)
    prompt, _ = pipeline.build_prompt(images(1, seed=12), "<image>\nwhat is in this picture", True, Stopwatch())
    count = len(prompt)
    float_logits, float_cache = reference.step(prompt, reference.start())
    for capacity in (None, count + 9):
        cache = mixed.start(capacity=capacity)
        logits, cache = mixed.step(prompt, cache)
        np.testing.assert_allclose(logits, float_logits, rtol=0, atol=1e-5 * float(np.abs(float_logits).max()))
        for layer, (past_key, past_value) in enumerate(zip(spec.io.past_keys, spec.io.past_values)):
            for name, kind in ((past_key, "k"), (past_value, "v")):
                scale = scales[f"model.layers.{layer}.attn.{kind}_scale"].reshape(1, spec.num_kv_heads, 1, -1)
                expected = np.clip(np.rint(float_cache.values[name].numpy() / scale), -128, 127).astype(np.int8)
                held = cache.bound.arrays[name][:, :, :count] if capacity else cache.values[name].numpy()
                np.testing.assert_array_equal(held, expected)

    reference_rows, greedy = decode_rows(reference, prompt, count + 9)
    shared, _ = decode_rows(mixed, prompt, count + 9, greedy)
    grown, _ = decode_rows(mixed, prompt, None, greedy)
    np.testing.assert_array_equal(shared, grown)
    span = float(reference_rows.max() - reference_rows.min())
    print(f"mixed KV cache: max |logit difference| {float(np.abs(shared - reference_rows).max()) / span:.4f} of the range")
    assert float(np.abs(shared - reference_rows).max()) <= 0.02 * span
    assert [int(np.argmax(r)) for r in shared[:-1]] == greedy

    altered = dataclasses.replace(spec, kv_cache=dict(spec.kv_cache, prefill_switch="past_key_values.0.key"))
    with pytest.raises(ArtifactError, match="not a bool"):
        check_decoder_io(mixed.session, altered, path)
    with pytest.raises(ArtifactError, match="does not have"):
        check_decoder_io(mixed.session, dataclasses.replace(spec, kv_cache=dict(spec.kv_cache, prefill_switch="x")), path)


def test_the_rotary_envelope_bounds_a_key_at_every_position():
    """A key channel's scale must hold at positions calibration never reached: rotary turns each pair (d, d + D/2)
    (or (2i, 2i + 1), interleaved) by a position's angle, and the pair's norm bounds both channels at every angle,
    where the channel's own calibrated magnitude does not."""
    from prumerge.export.kv_cache import rotary_envelope

    rng = np.random.default_rng(0)
    keys = rng.normal(0, 1, (50, 8)).astype(np.float32)
    for interleaved in (False, True):
        first, second = (np.arange(0, 8, 2), np.arange(1, 8, 2)) if interleaved else (np.arange(4), np.arange(4, 8))
        envelope = rotary_envelope(keys, interleaved).max(axis=0)
        own = np.abs(keys).max(axis=0)
        beyond = 0
        for angle in np.linspace(0, 2 * np.pi, 64):
            turned = keys.copy()
            turned[:, first] = keys[:, first] * np.cos(angle) - keys[:, second] * np.sin(angle)
            turned[:, second] = keys[:, first] * np.sin(angle) + keys[:, second] * np.cos(angle)
            assert (np.abs(turned).max(axis=0) <= envelope + 1e-5).all()
            beyond += int((np.abs(turned).max(axis=0) > own + 1e-5).any())
        assert beyond > 0  # without the envelope, some angle exceeds the channel's own range


def test_a_decoder_built_before_the_lm_head_was_pruned_still_generates(llm_artifact, llava_dir, tmp_path, monkeypatch):
    """An artifact built before ``prune_lm_head`` (logits for every position; a manifest without ``llm.logits``)
    runs as before: every row on request, and shared-buffer steps (whose logits change shape with the step's length)
    equal recomputation and the pruned decoder's last row."""
    from transformers import AutoConfig

    import prumerge.export.llm as llm
    from prumerge.artifact.manifest import LLMSection
    from prumerge.runtime.llm import OnnxDecoder

    monkeypatch.setattr(llm, "COMMON_BUILDER_OPTIONS", {})
    section = llm.build_llm(str(llava_dir), None, AutoConfig.from_pretrained(llava_dir), tmp_path, "fp32", "cpu")
    assert section.pop("logits") == "all"  # popped: a manifest written before the field existed
    old = OnnxDecoder(tmp_path, LLMSection.from_dict(section, "llm"))
    pruned = Pipeline.from_artifacts(llm_artifact).decoder
    embeds = np.random.default_rng(1).normal(0, 1, (20, old.embeddings.shape[1])).astype(np.float32)
    full, _ = old.step(embeds, old.start(), all_logits=True)
    assert full.shape == (20, old.embeddings.shape[0])
    np.testing.assert_allclose(pruned.step(embeds, pruned.start())[0], full[-1], atol=1e-4)
    _steps_match(old, old.start(capacity=24), embeds, full)


def test_counts_timings_streaming_and_stops(llm_artifact, tmp_path):
    pipeline = Pipeline.from_artifacts(llm_artifact)
    stream = pipeline.generate(images(1), "<image> describe", max_new_tokens=10, stream=True)
    pieces = list(stream)
    result = stream.result
    assert "".join(pieces) == result.text
    assert result.visual_tokens[0] >= 2 and result.prompt_tokens > result.visual_tokens[0]
    for key in ("preprocess", "vision", "embed", "prefill", "ttft", "decode", "total"):
        assert result.timings_ms[key] >= 0
    assert result.timings_ms["ttft"] <= result.timings_ms["total"]
    assert result.text, "greedy on this model produces text here (deterministic); the stop-string check needs it"
    stop = result.text[len(result.text) // 2:][:2] or result.text[:1]
    stopped_stream = pipeline.generate(images(1), "<image> describe", max_new_tokens=10, stop=[stop], stream=True)
    streamed = "".join(stopped_stream)
    stopped = stopped_stream.result
    expected = result.text[: result.text.index(stop)]  # the answer ends right before the stop string
    assert stopped.text == streamed == expected and stopped.stop_reason == "stop_string"
    from click.testing import CliRunner
    from PIL import Image

    from prumerge.cli import main

    Image.fromarray(images(1)[0]).save(tmp_path / "img.png")
    cli = CliRunner().invoke(main, ["run", str(llm_artifact), "--image", str(tmp_path / "img.png"), "--prompt",
                                    "<image> describe", "--max-new-tokens", "10", "--stop", stop, "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["text"] == expected
    a = pipeline.generate(None, "the quick", max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    b = pipeline.generate(None, "the quick", max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids


def test_baseline_graph_gives_all_patches(llm_artifact):
    reduced = Pipeline.from_artifacts(llm_artifact).generate(images(1), "<image> hi", max_new_tokens=2)
    full = Pipeline.from_artifacts(llm_artifact, method="none").generate(images(1), "<image> hi", max_new_tokens=2)
    assert full.visual_tokens == [64] and reduced.visual_tokens[0] < 64
    assert full.prompt_tokens - reduced.prompt_tokens == 64 - reduced.visual_tokens[0]


def test_prompt_errors(llm_artifact, artifact_factory):
    pipeline = Pipeline.from_artifacts(llm_artifact)
    with pytest.raises(InputError, match="prompt is empty"):
        pipeline.generate(images(1), "   ")
    # no marker: the image goes before the text, as LLaVA's CLI puts it (same chunks as an explicit "<image>\n")
    assert pipeline.prompt_chunks("describe", 1) == pipeline.prompt_chunks("<image>\ndescribe", 1)
    assert [c.kind for c in pipeline.prompt_chunks("describe", 1)] == ["text", "image", "text"]
    with pytest.raises(InputError, match="but no image was given"):
        pipeline.generate(None, "<image> describe")
    with pytest.raises(InputError, match="2 <image> marker.* for 1 image"):
        pipeline.generate(images(1), "<image> <image>")
    with pytest.raises(InputError, match="exceed this artifact's batch limit of 16"):
        pipeline.generate(images(17), "<image>" * 17)
    with pytest.raises(InputError, match="context is 2048"):
        pipeline.generate(None, "the quick brown fox " * 700)
    with pytest.raises(InputError, match="max_new_tokens"):
        pipeline.generate(None, "hi", max_new_tokens=0)
    with pytest.raises(ConfigError, match="contiguous"):
        pipeline.generate(None, "hi", positions="patch")
    with pytest.raises(ArtifactError, match="no LLM"):
        Pipeline.from_artifacts(artifact_factory("llava", "prumerge", "padded"))
    with pytest.raises(ArtifactError, match="no baseline"):
        Pipeline.from_artifacts(artifact_factory("llava", "prumerge", "padded"), method="none")


# ---------------------------------------------------------------------------------------- guards (tests/README.md)
def test_nucleus_sampling_draws_from_the_nucleus_in_proportion():
    """Over many seeds: only nucleus tokens are drawn, not always the top one, in proportion to their renormalised
    probabilities (a sampler that always took the argmax, or ignored top_p, fails here)."""
    from prumerge.runtime.llm import choose_token

    probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = np.log(probs)
    draws = np.array([choose_token(logits, 1.0, 0.85, np.random.default_rng(seed)) for seed in range(3000)])
    assert set(draws.tolist()) == {0, 1, 2}  # nucleus of 0.85: 0.4 + 0.3 + 0.2 reaches it with token 2
    expected = probs[:3] / probs[:3].sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=3)[:3] / len(draws), expected, atol=0.03)
    # temperature sharpens: at 0.25 the top token dominates (0.4^4 / sum of 4th powers = 0.73 of the nucleus)
    sharp = np.array([choose_token(logits, 0.25, 1.0, np.random.default_rng(seed)) for seed in range(2000)])
    assert 0.68 < (sharp == 0).mean() < 0.78
    assert choose_token(logits, 0.0, 0.5, np.random.default_rng(0)) == 0


def test_each_image_lands_where_its_marker_is(llm_artifact):
    """The embedding sequence itself: the rows between the text chunks are exactly each image's tokens, in marker
    order (swapping the images' order, or dropping one, changes which rows sit where)."""
    from prumerge.runtime.llm import Stopwatch

    pipeline = Pipeline.from_artifacts(llm_artifact)
    first, second = images(4)[1], images(4)[2]
    tokens = [pipeline.vision.run([img]).image(0) for img in (first, second)]
    assert tokens[0].shape != tokens[1].shape or not np.allclose(tokens[0], tokens[1])
    prompt = "<image> left, <image> right"
    embeds, counts = pipeline.build_prompt([first, second], prompt, True, Stopwatch())
    chunks = pipeline.prompt_chunks(prompt, 2)
    assert [c.kind for c in chunks] == ["text", "image", "text", "image", "text"]
    placed = place_images(chunks, counts)
    for chunk, start in zip(placed, chunk_starts(placed)):
        expected = pipeline.decoder.embed(list(chunk.ids)) if chunk.kind == "text" else tokens[chunk.image]
        assert chunk.n_tokens == chunk.n_pos == len(expected)
        np.testing.assert_allclose(embeds[start: start + chunk.n_tokens], expected, atol=1e-6)
    assert chunk_starts(placed)[-1] + placed[-1].n_pos == len(embeds) and counts == [len(t) for t in tokens]


def test_every_file_of_the_llm_is_verified(llm_artifact, tmp_path):
    """Tampering with the decoder, its weights, the embedding table or the tokenizer is refused at load."""
    from prumerge.errors import ArtifactError

    names = sorted(p.relative_to(llm_artifact).as_posix() for p in (llm_artifact / "llm").rglob("*") if p.is_file())
    assert {"llm/embeddings.npy", "llm/tokenizer.json"} <= set(names) and any(n.endswith(".onnx") for n in names)
    for name in names:
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(llm_artifact, copy)
        path = copy / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit, same size
        path.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match=f"{name} does not match its sha256"):
            Pipeline.from_artifacts(copy)
