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


def _expected(question: str, things: list, size: int) -> str:
    """An independent reading of each question template against the scene's objects."""
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (hit,) = [t for t in things if t.shape == m[1]]
        return hit.color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (hit,) = [t for t in things if t.color == m[1]]
        return hit.shape
    if question == "How many objects are there?":
        return str(len(things))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(t.shape == m[1] for t in things))
    if m := re.fullmatch(r"Is there (a|an) (\w+) (\w+)\?", question):
        assert m[1] == ("an" if m[2] == "orange" else "a")  # "an orange", "a red"
        return "yes" if any(t.color == m[2] and t.shape == m[3] for t in things) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) (?:on the left or on the right|at the top or at the bottom)\?", question):
        (hit,) = [t for t in things if t.color == m[1] and t.shape == m[2]]
        if "left" in question:
            assert abs(hit.cx - size / 2) > 0.1 * size  # clearly on one side
            return "left" if hit.cx < size / 2 else "right"
        assert abs(hit.cy - size / 2) > 0.1 * size
        return "top" if hit.cy < size / 2 else "bottom"
    if m := re.fullmatch(r"Which is bigger, the (\w+) or the (\w+)\?", question):
        (a,) = [t for t in things if t.shape == m[1]]
        (b,) = [t for t in things if t.shape == m[2]]
        assert max(a.radius, b.radius) > 1.5 * min(a.radius, b.radius)  # clearly bigger
        return a.shape if a.radius > b.radius else b.shape
    raise AssertionError(f"unknown question {question!r}")


def test_every_answer_is_right_and_unambiguous():
    categories = set()
    for scene in shapes_qa.scenes(150, seed=5):
        for q in scene.questions:
            assert q.answer == _expected(q.text, scene.things, shapes_qa.SIZE), (q, scene.things)
            categories.add(q.category)
    assert categories == set(shapes_qa.CATEGORIES)


def test_yes_and_no_are_balanced_and_no_has_adversarial_negatives():
    answers, adversarial = [], 0
    for scene in shapes_qa.scenes(300, seed=4):
        for q in scene.questions:
            if q.category == "exists":
                answers.append(q.answer)
                if q.answer == "no":
                    color, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q.text).groups()
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
