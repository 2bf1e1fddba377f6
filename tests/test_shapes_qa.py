"""The generated question set: reproducible, drawn as labelled, every answer right and unambiguous."""

from __future__ import annotations

import json
import re

import numpy as np

from prumerge import shapes_qa
from prumerge.evaluate.questions import read_questions


def test_same_seed_same_scenes_and_other_seeds_differ():
    a = list(shapes_qa.scenes(5, seed=7))
    b = list(shapes_qa.scenes(5, seed=7))
    c = list(shapes_qa.scenes(5, seed=8))
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image)) and x.questions == y.questions
    assert not all(np.array_equal(np.asarray(x.image), np.asarray(z.image)) for x, z in zip(a, c))


def test_held_out_and_training_streams_share_no_image():
    train = {np.asarray(s.image).tobytes() for s in shapes_qa.scenes(40, shapes_qa.TRAIN_SEED)}
    held = {np.asarray(s.image).tobytes() for s in shapes_qa.scenes(40, shapes_qa.HELDOUT_SEED)}
    assert not train & held


def test_each_object_is_drawn_in_its_colour_where_the_labels_say():
    for scene in shapes_qa.scenes(30, seed=11):
        pixels = np.asarray(scene.image).astype(int)
        for thing in scene.things:
            y = int(thing.cy + (0.2 * thing.radius if thing.shape == "triangle" else 0))  # inside every shape
            got = pixels[y, int(thing.cx)]
            assert np.abs(got - np.array(shapes_qa.COLORS[thing.color])).max() <= 20, (thing, got)


def _one(words, text: str) -> str:
    found = [w for w in words if re.search(rf"\b{w}s?\b", text)]
    assert len(found) == 1, (words, text)
    return found[0]


def _expected(question: shapes_qa.Question, things: list, size: int) -> str:
    """An independent reading of a question, by the words it holds, against the scene's objects."""
    text, kind = question.text, question.kind
    colours, shapes = list(shapes_qa.COLORS), list(shapes_qa.SHAPES)
    if kind == "color":
        (hit,) = [t for t in things if t.shape == _one(shapes, text)]
        return hit.color
    if kind == "color_all":
        assert not any(re.search(rf"\b{w}", text) for w in colours + shapes), text
        assert len({t.color for t in things}) == 1
        return things[0].color
    if kind == "shape":
        (hit,) = [t for t in things if t.color == _one(colours, text)]
        return hit.shape
    if kind == "count":
        named = [w for w in shapes if re.search(rf"\b{w}s\b", text)]
        return str(sum(t.shape == named[0] for t in things) if named else len(things))
    if kind == "exists":
        colour, shape = _one(colours, text), _one(shapes, text)
        if m := re.search(r"\b(a|an) (\w+) ", text):
            assert m[1] == ("an" if m[2] == "orange" else "a")  # "an orange", "a red"
        return "yes" if any(t.color == colour and t.shape == shape for t in things) else "no"
    if kind in ("side", "height"):
        (hit,) = [t for t in things if t.color == _one(colours, text) and t.shape == _one(shapes, text)]
        if kind == "side":
            assert re.search(r"(?i)\bleft\b", text) and re.search(r"(?i)\bright\b", text)
            assert abs(hit.cx - size / 2) > 0.1 * size  # clearly on one side
            return "left" if hit.cx < size / 2 else "right"
        assert re.search(r"(?i)\btop\b", text) and re.search(r"(?i)\bbottom\b", text)
        assert abs(hit.cy - size / 2) > 0.1 * size
        return "top" if hit.cy < size / 2 else "bottom"
    if kind in ("bigger", "smaller"):
        named = [w for w in shapes if re.search(rf"\b{w}\b", text)]
        a, b = ([t for t in things if t.shape == w] for w in named)
        (a,), (b,) = a, b
        assert max(a.radius, b.radius) > 1.5 * min(a.radius, b.radius)  # clearly bigger
        small = re.search(r"small|tin", text) is not None
        assert small == (kind == "smaller"), text
        big, little = (a, b) if a.radius > b.radius else (b, a)
        return little.shape if small else big.shape
    raise AssertionError(f"unknown question {question!r}")


def test_every_answer_is_right_and_unambiguous():
    for split in shapes_qa.SPLITS:
        categories, kinds = set(), set()
        for scene in shapes_qa.scenes(150, seed=5, split=split):
            size = scene.image.width
            for q in scene.questions:
                assert q.answer == _expected(q, scene.things, size), (q, scene.things)
                categories.add(q.category)
                kinds.add(q.kind)
        assert categories == set(shapes_qa.CATEGORIES) and kinds == set(shapes_qa.WORDINGS), split


def _template(text: str) -> re.Pattern:
    """A wording template as a pattern that its filled questions (with or without an instruction) match."""
    parts = re.split(r"(\{\w+\})", text)
    body = "".join(r"[\w' ]+?" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(body + r"(?: .+)?")


def test_held_out_wordings_and_style_never_reach_the_training_split():
    """At least a third of every type's wordings is held out; a training question never matches a held-out template
    exactly (instruction included), and no training scene is drawn in the held-out style."""
    for category in shapes_qa.CATEGORIES:
        kinds = [k for k, c in shapes_qa.CATEGORY_OF.items() if c == category]
        split = [where for k in kinds for _, where in shapes_qa.WORDINGS[k]]
        assert len(split) >= 15 and split.count("heldout") / len(split) >= 0.3, category
    held_instructions = [t for t, where in shapes_qa.INSTRUCTIONS if where == "heldout"]
    styles = set()
    for scene in shapes_qa.scenes(200, seed=6, split="train"):
        styles.add(scene.style)
        for q in scene.questions:
            own = [t for t, w in shapes_qa.WORDINGS[q.kind] if w == "train" and _template(t).fullmatch(q.text)]
            assert own, q
            held = [t for t, w in shapes_qa.WORDINGS[q.kind] if w == "heldout" and _template(t).fullmatch(q.text)
                    and not any(_template(o).fullmatch(q.text) for o in own)]
            assert not held, (q, held)
            assert not any(q.text.endswith(i) for i in held_instructions), q
    assert styles == set(shapes_qa.TRAIN_STYLES)
    held = list(shapes_qa.scenes(6, seed=6, split="heldout"))
    assert [s.style == shapes_qa.HELDOUT_STYLE for s in held] == [False, True] * 3
    assert held[1].image.size == (shapes_qa.HELDOUT_STYLE_SIZE,) * 2


def test_yes_and_no_are_balanced_and_no_has_adversarial_negatives():
    answers, adversarial = [], 0
    for scene in shapes_qa.scenes(300, seed=4):
        for q in scene.questions:
            if q.category == "exists":
                answers.append(q.answer)
                if q.answer == "no":
                    color, shape = _one(shapes_qa.COLORS, q.text), _one(shapes_qa.SHAPES, q.text)
                    adversarial += any(t.color == color or t.shape == shape for t in scene.things)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    assert adversarial == answers.count("no")


def test_question_file_is_llava_format_and_reads_back(tmp_path):
    path = shapes_qa.write_question_file(tmp_path / "set", images=6, seed=9, per_image=3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(line) == {"question_id", "image", "text", "answer", "category"} for line in lines)
    assert all(len([x for x in lines if x["image"] == img]) <= 3 for img in {x["image"] for x in lines})
    questions = read_questions(path)
    assert len(questions) == len(lines) and all(q.image.is_file() for q in questions)
