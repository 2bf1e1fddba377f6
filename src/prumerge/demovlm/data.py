"""The demo VLM's training data: generated scenes encoded once by the exporter's own encoder (their three token
sets cached), the prompts as ``run`` sends them, and each patch's words for the alignment loss.

Separate from ``train`` (the loop, its optimiser, resume and record) because both ``train`` and the benches that
probe feature layers read the cache and labels without training anything.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from .. import shapes_qa

TOKEN_SETS = ("none", "prumerge", "prumerge+")


@dataclasses.dataclass
class Sample:
    """One training or evaluation sequence: ``prefix`` ids, the image's visual tokens, then ``tail`` ids, of which
    those at ``labels`` (indices into ``tail``) are the answer tokens the loss and the exact match are taken on."""

    image: int  # index into the cached features
    prefix: list  # prompt ids before the image
    tail: list  # ids after it: question, answer, (further turns)
    labels: list  # positions in ``tail`` of answer tokens
    category: str


@dataclasses.dataclass
class Cache:
    features: dict  # token set -> list of [n, D] fp16 tensors, one per image
    patch_labels: list  # per image: [P, len(ALIGN_WORDS)] long, a word index per group for each patch (-1: none)
    samples: list  # one question each, as run sends it (evaluation)
    conversations: list  # one per image: every question of the image in turn, then a caption turn (training)


class PromptIds:
    """Token ids of the prompt exactly as the runtime assembles it (``Pipeline.prompt_chunks`` on the exporter's
    ``prompt_format``), so training sees what ``run`` and ``evaluate`` send."""

    def __init__(self, checkpoint: Path) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        from ..artifact.manifest import LLMSection
        from ..export.llm import prompt_format
        from ..runtime.pipeline import Pipeline

        fmt, add_bos = prompt_format(checkpoint)
        hf = AutoTokenizer.from_pretrained(str(checkpoint))
        spec = LLMSection(model_type="llama", hidden_size=1, vocab_size=len(hf), prompt_format=fmt, add_bos=add_bos,
                          bos_token_id=hf.bos_token_id, image_marker="<image>")  # the prompt side of a manifest's LLM
        self.pipeline = Pipeline(None, None, Tokenizer.from_file(str(checkpoint / "tokenizer.json")), spec)
        self.eos = hf.eos_token_id

        # the chat template's text between an answer's end-of-turn and the next question, and after the question
        sentinel = "\u2063S{}\u2063"
        turns = [{"role": "user", "content": sentinel.format(0)}, {"role": "assistant", "content": sentinel.format(1)},
                 {"role": "user", "content": sentinel.format(2)}]
        rendered = hf.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        between = rendered[rendered.index(sentinel.format(1)) + len(sentinel.format(1)): rendered.index(sentinel.format(2))]
        eos_text = hf.convert_ids_to_tokens(self.eos)
        self.next_turn = between[len(eos_text):] if between.startswith(eos_text) else between
        self.after_question = rendered[rendered.index(sentinel.format(2)) + len(sentinel.format(2)):]

    def answer_ids(self, answer: str) -> list:
        return self.pipeline._plain.encode(answer, add_special_tokens=False).ids + [self.eos]

    def __call__(self, question: str, answer: str) -> tuple[list, list, list]:
        """(prefix, tail, labels) of one question as ``run`` sends it, and its answer."""
        chunks = self.pipeline.prompt_chunks(question, 1)
        image = [c.kind for c in chunks].index("image")
        prefix = [i for c in chunks[:image] for i in c.ids]
        suffix = [i for c in chunks[image + 1:] for i in c.ids]
        answer_ids = self.answer_ids(answer)
        return prefix, suffix + answer_ids, list(range(len(suffix), len(suffix) + len(answer_ids)))

    def conversation(self, turns: list) -> tuple[list, list, list]:
        """(prefix, tail, labels) of several (question, answer) turns about one image: the first exactly as ``run``
        sends it, the next ones as the chat template continues a conversation. Every answer is a label, so one
        pass over the image's tokens trains on all its questions."""
        prefix, tail, labels = self(*turns[0])
        encode = self.pipeline._encode
        for question, answer in turns[1:]:
            tail += encode([(self.next_turn, True)]) + encode([(question, False), (self.after_question, True)])
            answer_ids = self.answer_ids(answer)
            labels += list(range(len(tail), len(tail) + len(answer_ids)))
            tail += answer_ids
        return prefix, tail, labels


ALIGN_COLORS = (*shapes_qa.COLORS, "background")
ALIGN_SHAPES = (*shapes_qa.SHAPES, "background")
ALIGN_SIDES = ("left", "right")
ALIGN_HEIGHTS = ("top", "bottom")
ALIGN_SIZES = ("big", "small")
# one column of patch_labels per word group; the last two words of colour and shape name the background
ALIGN_WORDS = (ALIGN_COLORS, ALIGN_SHAPES, ALIGN_SIDES, ALIGN_HEIGHTS, ALIGN_SIZES)
ALIGN_SCALE = 20.0  # cosine logits x this: a sharp softmax over the words without letting norms grow


def patch_labels(things: list, patches: int, size: int = shapes_qa.SIZE) -> torch.Tensor:
    """``[patches, len(ALIGN_WORDS)]``: per word group, the index of the word a patch's token should read, from the
    generator's own drawing of each object's mask. An object's patch (its centre pixel inside the object, the
    object covering at least half of the patch) reads the object's colour, shape, side (left/right), half
    (top/bottom) and size (big/small); side and half only where the object is clearly there (as its position
    questions are asked), else -1. A patch no object touches reads "background" for colour and shape (-1 for the
    rest); edge patches are left out (-1) in every group.

    Why position and size words: a patch token says what is under it, but not where it is (only its place in the
    sequence does) nor how big its object is; questions about both were at chance before these words."""
    from PIL import Image, ImageDraw

    grid = int(round(patches ** 0.5))
    cell = size // grid
    out = torch.full((patches, len(ALIGN_WORDS)), -1, dtype=torch.long)
    out[:, 0], out[:, 1] = len(ALIGN_COLORS) - 1, len(ALIGN_SHAPES) - 1
    for t in things:
        mask = Image.new("L", (size, size))
        shapes_qa.draw_thing(ImageDraw.Draw(mask), t, 255)
        cover = np.asarray(mask)[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell) > 0
        share = cover.mean(axis=(1, 3)).reshape(-1)
        centre = cover[:, cell // 2, :, cell // 2].reshape(-1)
        side, height = t.side(size), t.height(size)
        label = torch.tensor([ALIGN_COLORS.index(t.color), ALIGN_SHAPES.index(t.shape),
                              ALIGN_SIDES.index(side) if side else -1, ALIGN_HEIGHTS.index(height) if height else -1,
                              ALIGN_SIZES.index("big" if t.big(size) else "small")])
        for p in np.flatnonzero(share > 0):
            out[p] = label if centre[p] and share[p] >= 0.5 else -1
    return out


def encode_scenes(encoder, count: int, seed: int, prompts: PromptIds, batch: int = 32, log=print,
                  split: str = "train") -> Cache:
    """Generate ``count`` scenes from ``seed`` worded from ``split`` (``shapes_qa.SPLITS``), encode each once (the
    three token sets), and tokenise its questions."""
    from ..reduce.config import Method, ReducerConfig
    from ..runtime.preprocess import preprocess_batch

    config = encoder.preprocess_config()
    reducers = {name: ReducerConfig(method=Method.parse(name)) for name in TOKEN_SETS[1:]}
    features = {name: [] for name in TOKEN_SETS}
    samples, images = [], []
    start = time.time()

    def flush():
        pixels = torch.from_numpy(preprocess_batch(images, config))
        with torch.no_grad():
            hidden, q, k = encoder.tower_outputs(pixels)
            prefix = encoder.adapter.prefix_tokens
            features["none"] += list(hidden[:, prefix:].to(torch.float16))
            for name, reducer in reducers.items():
                out = encoder.reduce(hidden, q, k, reducer)
                features[name] += [out.tokens[b, : int(out.num_tokens[b])].to(torch.float16) for b in range(len(images))]
        images.clear()

    conversations, labels = [], []
    order = np.random.default_rng(seed + 7)
    for i, scene in enumerate(shapes_qa.scenes(count, seed, split=split)):
        images.append(scene.image)
        labels.append(patch_labels(scene.things, encoder.num_patches, scene.image.width))
        for q in scene.questions:
            samples.append(Sample(i, *prompts(q.text, q.answer), q.category))
        turns = [(q.text, q.answer) for q in (scene.questions[j] for j in order.permutation(len(scene.questions)))]
        turns.append((shapes_qa.CAPTION_QUESTION, shapes_qa.caption(scene.things)))
        conversations.append(Sample(i, *prompts.conversation(turns), "conversation"))
        if len(images) == batch:
            flush()
            if (i + 1) % (batch * 20) == 0:
                log(f"encoded {i + 1}/{count} scenes ({time.time() - start:.0f} s)")
    if images:
        flush()
    return Cache(features, labels, samples, conversations)
