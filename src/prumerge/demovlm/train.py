"""Train the demo VLM: LLaVA's recipe at toy scale, on 2 CPU cores.

``python -m prumerge.demovlm.train --out weights_dir`` (see ``--help``). What it does, and why:

* **Features cached once.** The tower is frozen, so each generated scene is encoded once by the same
  ``PruMergeEncoder`` code the exporter traces (DINOv2-S at 224 px, no CLS: 256 patches), and its three token sets are
  kept: all 256 patches, PruMerge's reduced set and PruMerge+'s. Training then costs only the language model.
* **A middle tower layer** (``--feature-layer``, default -7: the output of block 6 of 12). Linear probes on single
  patches of generated scenes (``bench/probe_feature_layers.py``, ``docs/demo-vlm.md``) read colour at 90 % from the
  penultimate layer LLaVA uses and at 96 % from block 6, where shape is already 99.6 %: the penultimate layer has
  traded colour for semantics these questions do not need. The layer is recorded with the weights and written into the assembled checkpoint's
  ``vision_feature_layer``; PruMerge's selection still reads the last layer's attention, as the paper's.
* **Word-aligned visual tokens** (``--align-steps``, ``--align-weight``). The generator knows what lies under every
  patch, so the projector is first trained (cheaply: no language model) to make each patch's token point towards the
  LLM's own embedding of its object's colour, shape, side, half and size words ("background" elsewhere; cosine
  logits over each group's words).
  The language model then starts from visual tokens that already read as "red ... star" and only has to learn to
  answer about them; the same loss stays on, weighted, during the full training.
* **Reduced token sets in training.** A projector trained on full token sets alone collapses on reduced ones
  (measured before this script existed: 21/60 full vs 4/60 reduced after 80 steps). Released PruMerge checkpoints
  were fine-tuned on reduced tokens; here each batch draws one token set (``--mix``), so one model serves all three
  and the evaluation measures what reduction costs a model that has seen it.
* **Short sequences, loss on the answer only.** The prompt is exactly what ``run`` sends (the chat template built by
  the exporter, the image before the question); logits are computed only at the answer positions.
* **Trainable: projector + LoRA.** The projector alone (LLaVA's stage 1) learns which answer words exist, not which
  one the image shows (see the record); a rank-8 LoRA on every linear layer of the LLM (attention and MLP,
  ``--lora-targets``) is merged into it at assembly, so the exported decoder is an ordinary one.
* Greedy answers are exact-matched on a held-out split (another seed) every ``--eval-every`` steps: teacher-forced
  argmax at every answer position (the greedy answer equals the target iff each step's argmax does).

The outputs (``projector.safetensors``, ``lora.safetensors``, ``training.json`` with seed, steps, CPU time and
accuracy) are what ``prumerge.demovlm.assemble`` reads; the committed ones live in ``demovlm/weights/`` and the
defaults are their run's (its ``training.json`` holds the exact command; ``docs/demo-vlm.md`` the measurements).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import shapes_qa
from ..artifact.manifest import write_atomically
from .assemble import RECORD_FILE
from .data import (ALIGN_COLORS, ALIGN_HEIGHTS, ALIGN_SCALE, ALIGN_SHAPES, ALIGN_SIDES, ALIGN_SIZES,  # noqa: F401
                   ALIGN_WORDS, TOKEN_SETS, Cache, PromptIds, Sample, encode_scenes, patch_labels)


class Trainer:
    def __init__(self, lm, projector, lora_rank: int, seed: int, lora_targets: tuple = None, prompts: PromptIds | None = None) -> None:
        from .lora import TARGETS, add_lora

        torch.manual_seed(seed)
        self.lm = lm.eval()
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.projector = projector.train()
        self.lora = add_lora(self.lm.model, rank=lora_rank, targets=lora_targets or TARGETS) if lora_rank else []
        self.embed = self.lm.get_input_embeddings()
        if prompts is not None:  # the first token of each word as the model answers it
            self.align_words = [torch.tensor([prompts.answer_ids(w)[0] for w in words]) for words in ALIGN_WORDS]

    def align_loss(self, cache: Cache, images: list) -> torch.Tensor:
        """Cross-entropy of each labelled patch's visual token over each word group it has a label in (colour, shape,
        side, half, size), with logits ``ALIGN_SCALE * cos(token, word embedding)`` (cosine, so the loss cannot be
        met by growing norms); the mean over the groups these images have labels in (a scene of small objects
        in the middle has no side, half or big label)."""
        tokens = self.projector(torch.cat([cache.features["none"][i].float() for i in images]))
        labels = torch.cat([cache.patch_labels[i] for i in images])
        tokens = F.normalize(tokens.float(), dim=-1)
        losses = []
        for column, words in enumerate(self.align_words):
            keep = labels[:, column] >= 0
            if keep.any():
                targets = F.normalize(self.embed.weight[words].float(), dim=-1)
                losses.append(F.cross_entropy(ALIGN_SCALE * tokens[keep] @ targets.t(), labels[keep, column]))
        return torch.stack(losses).mean()

    def parameters(self) -> list:
        return list(self.projector.parameters()) + self.lora

    def batch_loss(self, cache: Cache, batch: list, token_set: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over answer tokens, per-sample exact match of every answer token's argmax)."""
        sequences, label_pos, labels = [], [], []
        for s in batch:
            visual = self.projector(cache.features[token_set][s.image].float())
            seq = torch.cat([self.embed(torch.tensor(s.prefix)), visual, self.embed(torch.tensor(s.tail))])
            start = len(s.prefix) + visual.shape[0]
            sequences.append(seq)
            label_pos.append(torch.tensor([start + j - 1 for j in s.labels]))  # position j-1 predicts token j
            labels.append(torch.tensor([s.tail[j] for j in s.labels]))
        longest = max(len(x) for x in sequences)
        embeds = torch.zeros(len(batch), longest, sequences[0].shape[1], dtype=sequences[0].dtype)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for b, seq in enumerate(sequences):  # right padding: positions stay 0..n-1 as at run time
            embeds[b, : len(seq)] = seq
            mask[b, : len(seq)] = 1
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        rows = torch.cat([torch.full((len(p),), b) for b, p in enumerate(label_pos)])
        logits = self.lm.lm_head(hidden[rows, torch.cat(label_pos)])
        target = torch.cat(labels)
        loss = F.cross_entropy(logits.float(), target)
        right = (logits.argmax(-1) == target).split([len(x) for x in labels])
        return loss, torch.stack([r.all() for r in right])

    @torch.no_grad()
    def accuracy(self, cache: Cache, token_set: str, batch: int = 16) -> tuple[float, dict]:
        self.projector.eval()
        hits, per_category = [], {}
        for i in range(0, len(cache.samples), batch):
            chunk = cache.samples[i: i + batch]
            with torch.no_grad():  # measured, not trained: no autograd graph over the LLM's activations
                _, right = self.batch_loss(cache, chunk, token_set)
            for s, r in zip(chunk, right.tolist()):
                hits.append(r)
                per_category.setdefault(s.category, []).append(r)
        self.projector.train()
        return float(np.mean(hits)), {k: round(float(np.mean(v)), 3) for k, v in sorted(per_category.items())}


def batches(cache: Cache, size: int, mix: dict, rng: random.Random):
    """Endless (token set, conversations) batches: one token set per batch (so a batch's lengths are alike), drawn
    with the ``mix`` probabilities; images shuffled each epoch."""
    order = list(range(len(cache.conversations)))
    names, weights = list(mix), list(mix.values())
    if len(order) < size:  # one pass could never fill a batch: the loop below would spin for ever without yielding
        raise SystemExit(f"--train-scenes {len(order)} is fewer than --batch {size}: no batch could be drawn")
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield rng.choices(names, weights)[0], [cache.conversations[j] for j in order[i: i + size]]


def resumed_batches(cache: Cache, size: int, mix: dict, seed: int, align_steps: int, step: int):
    """The batches a run of ``seed`` draws after its step ``step``: its alignment's image draws and its first
    ``step`` batches replayed (not trained on), so a resumed run sees the data order the whole run would have."""
    rng = random.Random(seed)
    for _ in range(align_steps):
        _align_images(rng, cache)
    stream = batches(cache, size, mix, rng)
    for _ in range(step):
        next(stream)
    return stream


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@dataclasses.dataclass
class Setup:
    """What training and measuring share: the base checkpoint's prompt ids, encoder and LLaVA config."""

    prompts: PromptIds
    encoder: object
    config: object


def prepare(scratch: Path, seed: int = 0, feature_layer: int | None = None) -> Setup:
    """Assemble the base checkpoint (fresh projector, no LoRA) in ``scratch`` and open what training needs.
    ``feature_layer``: default the committed weights' (what the tests measure them with)."""
    from transformers import AutoConfig

    from ..model.encoder import PruMergeEncoder
    from .assemble import build_checkpoint

    checkpoint = build_checkpoint(scratch / "base", projector={}, lora={}, seed=seed, vision_feature_layer=feature_layer)
    return Setup(PromptIds(checkpoint), PruMergeEncoder.from_pretrained(checkpoint, method="none", project=False),
                 AutoConfig.from_pretrained(str(checkpoint)))


def new_trainer(setup: Setup, lora_rank: int, seed: int, projector: dict | None = None, lora: dict | None = None,
                lora_targets: tuple | None = None) -> Trainer:
    """SmolLM2 + a projector (fresh, or ``projector``) + LoRA (fresh, or ``lora`` loaded into it, on the layers it
    names)."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from .smollm2 import smollm2

    lm, _ = smollm2()
    if lora:
        lora_targets = tuple(sorted({k.rsplit(".", 2)[-2] for k in lora if k.endswith(".lora_A")}))
    torch.manual_seed(seed)
    trainer = Trainer(lm, LlavaMultiModalProjector(setup.config), lora_rank, seed, lora_targets, setup.prompts)
    if projector is not None:
        trainer.projector.load_state_dict(projector)
    if lora:
        modules = dict(trainer.lm.named_modules())
        for key, value in lora.items():
            name, _, field = key.rpartition(".")
            if field in ("lora_A", "lora_B"):
                getattr(modules[name], field).data.copy_(value)
    return trainer


def measure(weights: Path, scenes: int, seed: int = shapes_qa.HELDOUT_SEED, token_sets=TOKEN_SETS, log=print,
            setup: Setup | None = None, split: str = "heldout") -> dict:
    """Held-out accuracy (fp32, greedy = teacher-forced argmax) of the weights in ``weights`` on the first
    ``scenes`` scenes of ``seed``: the slice the committed weights' record is checked against."""
    from safetensors.torch import load_file

    if setup is None:
        from .assemble import feature_layer

        layer = feature_layer(weights) if (weights / RECORD_FILE).is_file() else None
        with tempfile.TemporaryDirectory() as scratch:
            setup = prepare(Path(scratch), feature_layer=layer)
    cache = encode_scenes(setup.encoder, scenes, seed, setup.prompts, log=log, split=split)
    lora = load_file(str(weights / "lora.safetensors")) if (weights / "lora.safetensors").is_file() else {}
    rank = next((int(v.shape[0]) for k, v in lora.items() if k.endswith(".lora_A")), 0)
    trainer = new_trainer(setup, rank, 0, load_file(str(weights / "projector.safetensors")), lora)
    out = {"scenes": scenes, "seed": seed, "split": split, "questions": len(cache.samples)}
    for name in token_sets:
        out[name], out[f"{name}_by_category"] = trainer.accuracy(cache, name)
    return out


def train(out: Path, steps: int, train_scenes: int, heldout_scenes: int, batch: int, lr: float, lora_rank: int,
          mix: dict, eval_every: int, seed: int, log=print, bf16: bool = True, lora_lr_ratio: float = 0.3,
          stop_after: int | None = None, feature_layer: int = -7, align_steps: int = 0, align_weight: float = 0.0,
          lora_targets: tuple | None = None, resume: int | None = None, init: Path | None = None,
          force: bool = False) -> dict:
    """Train for ``steps`` of a cosine schedule; ``stop_after``: end after that many of them (the schedule is still
    the one of ``steps``, so a run stopped early is reproduced exactly by the same two numbers).

    ``resume``: continue the run already in ``out`` from its step ``resume`` (its weights, record and, when it saved
    one, optimizer state), on the same schedule and the same data order (the random draws of the steps already run
    are replayed), so a run stopped for time can be finished later instead of started again. Without a saved
    optimizer state (runs before it was saved) AdamW's moments start afresh at that step; the record says which.

    ``init``: start from another run's trained weights instead of a fresh projector and LoRA (a continuation stage:
    its own schedule, usually a lower ``lr``, and with another ``seed`` scenes the first run never saw); no alignment
    stage (that exists to start a fresh projector). The record keeps that run's record as ``init`` and adds its CPU
    and wall time to the totals, so the committed weights say everything that made them.

    Everything a run could be refused for is checked before ``out`` is made or anything is prepared: the numbers,
    the mix, ``out`` (a finished or stopped run there is kept unless ``force``; ``--resume`` continues it), and
    the records and weights ``resume`` / ``init`` read."""
    cpu_start, wall_start = time.process_time(), time.time()
    check_settings(steps=steps, train_scenes=train_scenes, heldout_scenes=heldout_scenes, batch=batch, lr=lr,
                   lora_rank=lora_rank, mix=mix, eval_every=eval_every, stop_after=stop_after,
                   lora_lr_ratio=lora_lr_ratio, resume=resume)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder")
    if resume is None and not force and ((out / RECORD_FILE).is_file() or (out / "projector.safetensors").is_file()):
        raise SystemExit(f"--out {out} already holds a training run; continue it with --resume STEP, or pass --force "
                         "to train a new one over it")
    prior = _resumable(out, resume, steps, seed) if resume else None
    start = _init_record(init, out) if init is not None and prior is None else None
    # the weights a resumed or continued run starts from, read (and so checked) before anything is prepared
    loaded = _trained_weights(out) if prior is not None else _trained_weights(init) if start is not None else None
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        setup = prepare(Path(scratch), seed, feature_layer)
    train_cache = encode_scenes(setup.encoder, train_scenes, shapes_qa.TRAIN_SEED + 100 * seed, setup.prompts, log=log)
    held_cache = encode_scenes(setup.encoder, heldout_scenes, shapes_qa.HELDOUT_SEED, setup.prompts, log=log,
                               split="heldout")
    counts = {name: float(np.mean([len(f) for f in train_cache.features[name]])) for name in TOKEN_SETS}
    log(f"cached {len(train_cache.conversations)} training conversations ({len(train_cache.samples)} questions) / "
        f"{len(held_cache.samples)} held-out questions; "
        f"mean visual tokens {counts} ({time.time() - wall_start:.0f} s)")
    state = None
    if prior is not None:
        projector, lora, state = loaded
        trainer = new_trainer(setup, lora_rank, seed, projector, lora)
        align_steps, align_log = prior.get("align_steps", align_steps), prior["align_losses"]  # as it ran (0 after --init)
    elif start is not None:
        projector, lora, _ = loaded
        trainer = new_trainer(setup, lora_rank, seed, projector, lora)
        align_steps, align_log, lora_targets = 0, [], tuple(start.get("lora_targets") or ())
    else:
        trainer = new_trainer(setup, lora_rank, seed, lora_targets=lora_targets)
        align_log = align(trainer, train_cache, align_steps, lr, random.Random(seed), log) if align_steps else []
    params = trainer.parameters()
    groups = [{"params": list(trainer.projector.parameters()), "peak": lr}]
    if trainer.lora:
        groups.append({"params": trainer.lora, "peak": lr * lora_lr_ratio})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    history, losses, resumed = [], [], []
    # one stream of draws per seed, alignment images then batches: replayed up to where this run starts
    stream = resumed_batches(train_cache, batch, mix, seed, align_steps, resume or 0)
    if prior is not None:
        history, losses = prior["history"], prior["losses"]
        resumed = prior.get("resumed", []) + [{"at_step": resume, "optimizer_state": state is not None}]
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
    step_start = time.time()
    interrupted = stopped_by = None
    with StopRequest() as stop:
        for step in range(resume or 0, min(steps, stop_after or steps)):
            if stop.requested:  # SIGINT / SIGTERM: end between steps, keep what was trained, say so in the record
                interrupted, stopped_by = step, stop.signal
                log(f"stop requested: ending after step {step}")
                break
            _train_step(trainer, optimizer, params, stream, train_cache, steps, step, bf16, align_weight, losses)
            if (step + 1) % 10 == 0:
                log(f"step {step + 1}/{steps} loss {np.mean(losses[-10:]):.3f} "
                    f"({(time.time() - step_start) / (step + 1 - (resume or 0)):.2f} s/step)")
            if eval_every and ((step + 1) % eval_every == 0 or step + 1 in (steps, stop_after)):
                row = {"step": step + 1, "loss": round(float(np.mean(losses[-eval_every:])), 4)}
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    for name in TOKEN_SETS:
                        row[name], row[f"{name}_by_category"] = trainer.accuracy(held_cache, name)
                history.append(row)
                log(json.dumps(row))
                save_weights(trainer, out, optimizer)
    save_weights(trainer, out, optimizer)
    record = {
        "seed": seed, "steps": steps, "stop_after": stop_after, "steps_run": len(losses), "batch": batch, "lr": lr, "lora_lr": lr * lora_lr_ratio, "lora_rank": lora_rank,
        "mix": mix, "conversations": "every question of an image in one sequence (first turn as run sends it), then a caption turn",
        "wordings": "shapes_qa train split (held-out wordings and scene style never trained on)",
        "train_scenes": train_scenes, "train_questions": len(train_cache.samples), "train_seed": shapes_qa.TRAIN_SEED + 100 * seed,
        "heldout_scenes": heldout_scenes, "heldout_questions": len(held_cache.samples), "heldout_seed": shapes_qa.HELDOUT_SEED,
        "heldout_split": "heldout", "bf16_autocast": bf16, "mean_visual_tokens": counts, "vision_feature_layer": feature_layer,
        "align_steps": align_steps, "align_weight": align_weight, "align_losses": align_log,
        "lora_targets": list(lora_targets or ()) or None,
        "cpu_seconds": round(time.process_time() - cpu_start + (prior or start or {}).get("cpu_seconds", 0), 1),
        "wall_seconds": round(time.time() - wall_start + (prior or start or {}).get("wall_seconds", 0), 1),
        "torch_threads": torch.get_num_threads(), "history": history, "losses": [round(x, 4) for x in losses],
        "interrupted_after": interrupted, "interrupted_by_signal": stopped_by,
    }
    if resumed:
        record["resumed"] = resumed
    if start is not None or (prior or {}).get("init"):
        record["init"] = start if start is not None else prior["init"]
    write_atomically(out / RECORD_FILE, lambda p: p.write_text(json.dumps(record, indent=1)))
    return record


def align(trainer: Trainer, cache: Cache, steps: int, lr: float, rng: random.Random, log=print, images: int = 32) -> list:
    """Projector-only alignment: ``steps`` of :meth:`Trainer.align_loss` on ``images`` random images each (no
    language model forward, so a step costs milliseconds); returns the loss every 50 steps."""
    optimizer = torch.optim.AdamW(trainer.projector.parameters(), lr=lr, weight_decay=0.0)
    losses, out = [], []
    for step in range(steps):
        loss = trainer.align_loss(cache, _align_images(rng, cache, images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            out.append(round(float(np.mean(losses[-50:])), 4))
            log(f"align {step + 1}/{steps} loss {out[-1]:.3f}")
    return out


def _align_images(rng: random.Random, cache: Cache, images: int = 32) -> list:
    return rng.sample(range(len(cache.patch_labels)), min(images, len(cache.patch_labels)))


def _resumable(out: Path, step: int, steps: int, seed: int) -> dict:
    """The record of the run in ``out`` if it can be continued from ``step``: it ran exactly that many steps of the
    same schedule and seed (anything else would not be that run continued)."""
    path = out / RECORD_FILE
    if not path.is_file() or not (out / "projector.safetensors").is_file():
        raise SystemExit(f"--resume: {out} holds no training run (training.json and projector.safetensors)")
    prior = _read_record(path, "--resume")
    for name, want in (("steps_run", step), ("steps", steps), ("seed", seed)):
        if prior.get(name) != want:
            raise SystemExit(f"--resume {step}: the run in {out} has {name} {prior.get(name)!r}, not {want!r}")
    return prior


def _trained_weights(run: Path) -> tuple[dict, dict, dict | None]:
    """A run's projector and LoRA (fp32 from its optimizer state where saved: the committed LoRA file is fp16), and
    that state (None where the run predates it)."""
    from safetensors.torch import load_file

    try:
        state = torch.load(run / RESUME_FILE, weights_only=True) if (run / RESUME_FILE).is_file() else None
        lora = load_file(str(run / "lora.safetensors")) if (run / "lora.safetensors").is_file() else {}
        lora = state["lora"] if state and state["lora"] else lora
        return load_file(str(run / "projector.safetensors")), lora, state
    except Exception as exc:  # safetensors' and torch's errors for a truncated or foreign file have no common base
        raise SystemExit(f"{run}: its weights cannot be read ({exc.__class__.__name__}: {str(exc)[:120]}); "
                         "the run is damaged") from None


def _init_record(init: Path, out: Path) -> dict:
    """The record of the run ``init`` names (without its per-step losses), or a one-line exit: a continuation starts
    from a finished run's weights, never from the directory it is about to overwrite."""
    path = init / RECORD_FILE
    if not path.is_file() or not (init / "projector.safetensors").is_file():
        raise SystemExit(f"--init: {init} holds no training run (training.json and projector.safetensors)")
    if init.resolve() == out.resolve():
        raise SystemExit(f"--init: {init} is --out itself; continue a stopped run there with --resume")
    return {k: v for k, v in _read_record(path, "--init").items() if k != "losses"}


def _read_record(path: Path, flag: str) -> dict:
    """A run's record, or a one-line exit naming the file."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise SystemExit(f"{flag}: {path} is not a readable training record ({exc.__class__.__name__})") from None
    if not isinstance(record, dict) or not isinstance(record.get("history", []), list):
        raise SystemExit(f"{flag}: {path} is not a training record (not a JSON object with a history)")
    return record


def _train_step(trainer, optimizer, params, stream, cache, steps, step, bf16, align_weight, losses) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, steps, group["peak"], warmup=max(1, steps // 20))
    token_set, chunk = next(stream)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = trainer.batch_loss(cache, chunk, token_set)
        if align_weight:
            loss = loss + align_weight * trainer.align_loss(cache, [s.image for s in chunk])
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    losses.append(float(loss.detach()))


class StopRequest:
    """While active, SIGINT and SIGTERM set ``requested`` instead of killing the run, so training ends between two
    steps and still saves its weights and writes its record (a run stopped for time is then recorded by itself)."""

    def __enter__(self) -> "StopRequest":
        import signal
        import threading

        self.requested, self.signal, self._previous = False, None, {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._request)
        return self

    def _request(self, number, _frame) -> None:
        self.requested, self.signal = True, number

    def __exit__(self, *_) -> None:
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)


RESUME_FILE = "resume.pt"  # AdamW's moments and the fp32 LoRA, for --resume; never committed with the weights


def save_weights(trainer: Trainer, out: Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    from safetensors.torch import save_file

    from .lora import lora_state

    projector = {k: v.detach().contiguous() for k, v in trainer.projector.state_dict().items()}
    write_atomically(out / "projector.safetensors", lambda p: save_file(projector, str(p)))
    if trainer.lora:
        # fp16 halves the committed file; the slice the tests check is measured from the stored file
        lora = {k: (v.half() if k.endswith(("lora_A", "lora_B")) else v).contiguous()
                for k, v in lora_state(trainer.lm).items()}
        write_atomically(out / "lora.safetensors", lambda p: save_file(lora, str(p)))
    if optimizer is not None:
        state = {"optimizer": optimizer.state_dict(), "lora": lora_state(trainer.lm) if trainer.lora else {}}
        write_atomically(out / RESUME_FILE, lambda p: torch.save(state, p))


def parse_mix(text: str) -> dict:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in TOKEN_SETS:
            raise SystemExit(f"--mix: unknown token set {name!r} (one of {', '.join(TOKEN_SETS)})")
        try:
            mix[name] = float(weight or 1)
        except ValueError:
            raise SystemExit(f"--mix: the weight of {name} must be a number, not {weight!r}") from None
    return mix


def check_settings(steps, train_scenes, heldout_scenes, batch, lr, lora_rank, mix, eval_every, stop_after,
                   lora_lr_ratio, resume) -> None:
    """One-line exits for settings no run can use, before anything is prepared (a minute of encoding used to come
    first). A batch is drawn from one shuffled pass over the training scenes, so fewer scenes than a batch would
    never yield one: that run used to spin forever."""
    for name, value, low in (("--steps", steps, 1), ("--train-scenes", train_scenes, 1), ("--batch", batch, 1),
                             ("--heldout-scenes", heldout_scenes, 1), ("--lora-rank", lora_rank, 0),
                             ("--eval-every", eval_every, 0)):
        if value < low:
            raise SystemExit(f"{name} must be >= {low}, got {value}")
    if stop_after is not None and not 1 <= stop_after <= steps:
        raise SystemExit(f"--stop-after must be in 1..--steps ({steps}), got {stop_after}")
    if resume is not None and not 1 <= resume < steps:
        raise SystemExit(f"--resume must be in 1..{steps - 1}, got {resume}")
    if not (lr > 0 and math.isfinite(lr)) or not (lora_lr_ratio >= 0 and math.isfinite(lora_lr_ratio)):
        raise SystemExit(f"--lr must be > 0 and --lora-lr-ratio >= 0, got {lr} and {lora_lr_ratio}")
    if train_scenes < batch:
        raise SystemExit(f"--train-scenes {train_scenes} is fewer than --batch {batch}: no batch could be drawn")
    if not all(w >= 0 and math.isfinite(w) for w in mix.values()) or not sum(mix.values()) > 0:
        raise SystemExit(f"--mix weights must be >= 0 with at least one above 0, got {mix}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--heldout-scenes", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-lr-ratio", type=float, default=0.5, help="LoRA learning rate = --lr x this")
    parser.add_argument("--stop-after", type=int, default=None, help="end after N steps of the --steps schedule")
    parser.add_argument("--mix", default="none=0.4,prumerge=0.3,prumerge+=0.3")
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--feature-layer", type=int, default=-7, help="the tower's hidden state the projector reads")
    parser.add_argument("--align-steps", type=int, default=300, help="projector-only word-alignment steps first")
    parser.add_argument("--align-weight", type=float, default=0.5, help="weight of the alignment loss during training")
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                        help="comma-separated linear layer names of the LLM that get a LoRA")
    parser.add_argument("--resume", type=int, default=None, metavar="STEP",
                        help="continue the run in --out from its step STEP (same schedule, same data order)")
    parser.add_argument("--init", type=Path, default=None, metavar="DIR",
                        help="start from the trained weights in DIR: a continuation stage on its own schedule (no alignment)")
    parser.add_argument("--force", action="store_true", help="train a new run over the one already in --out")
    parser.add_argument("--measure", type=int, default=0, metavar="SCENES",
                        help="only measure the weights in --out on the first SCENES held-out scenes (fp32) and add "
                             "the result to its training.json as the slice the tests check")
    args = parser.parse_args(argv)
    if args.measure:
        result = measure(args.out, args.measure)
        path = args.out / "training.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        record["heldout_slice"] = result
        path.write_text(json.dumps(record, indent=1))
        print(json.dumps(result))
        return
    record = train(args.out, args.steps, args.train_scenes, args.heldout_scenes, args.batch, args.lr, args.lora_rank,
                   parse_mix(args.mix), args.eval_every, args.seed, log=lambda m: print(m, flush=True), bf16=not args.fp32,
                   lora_lr_ratio=args.lora_lr_ratio, stop_after=args.stop_after, feature_layer=args.feature_layer,
                   align_steps=args.align_steps, align_weight=args.align_weight,
                   lora_targets=tuple(args.lora_targets.split(",")), resume=args.resume, init=args.init,
                   force=args.force)
    print(json.dumps({k: v for k, v in record.items() if k != "history"}))
    if record.get("interrupted_by_signal"):  # saved and recorded, but stopped: not a finished run's exit status
        raise SystemExit(128 + int(record["interrupted_by_signal"]))


if __name__ == "__main__":
    main()
