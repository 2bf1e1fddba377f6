"""A procedurally generated visual question-answering set: coloured shapes on varied backgrounds, with questions
whose answers are one word (a colour, a shape, a number, yes/no, left/right/top/bottom).

Why it exists: no LLaVA weights or VQA data are available offline, yet the toolkit's users ask an answer-level
question first (how much accuracy does PruMerge cost?). The demo VLM is trained on this set (``demovlm.train``) and
evaluated on a held-out split of it (``prumerge-export evaluate``); the split is a seed, so the held-out images are
never seen in training. numpy + PIL only: the device side can write an evaluation set too.

Every question is answerable from the image alone and unambiguous: a question names an object only by attributes
that are unique in its scene, positions are asked only when the object is clearly on one side, sizes only when the
two objects differ clearly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SIZE = 224
SHAPES = ("circle", "square", "triangle", "star")
COLORS = {  # name -> base RGB; each drawing jitters it a little
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 20), "purple": (140, 40, 180), "orange": (250, 140, 0),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
CATEGORIES = ("color", "shape", "count", "exists", "position", "size")
SMALL_RADII, LARGE_RADII = (12.0, 20.0), (28.0, 40.0)  # two clearly different sizes: "big" is the second range
POSITION_MARGIN = 0.12  # an object is on a side only when its centre is this share of the image away from the middle
# disjoint streams: training; held-out (watched during training); evaluation (used nowhere in training)
TRAIN_SEED, HELDOUT_SEED, EVAL_SEED = 1, 2, 4


@dataclasses.dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    cx: float
    cy: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def big(self) -> bool:
        return self.radius >= LARGE_RADII[0]

    def side(self, size: int = SIZE) -> str | None:
        """"left" or "right" where the object is clearly on that side, else None."""
        return None if abs(self.cx - size / 2) <= size * POSITION_MARGIN else "left" if self.cx < size / 2 else "right"

    def height(self, size: int = SIZE) -> str | None:
        """"top" or "bottom" where the object is clearly in that half, else None."""
        return None if abs(self.cy - size / 2) <= size * POSITION_MARGIN else "top" if self.cy < size / 2 else "bottom"


def article(word: str) -> str:
    """"an orange", "a red": the article a question or caption puts before ``word``."""
    return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class Question:
    text: str
    answer: str
    category: str


@dataclasses.dataclass
class Scene:
    image: object  # PIL.Image
    things: list
    questions: list


def _background(rng, size: int):
    import numpy as np

    kind = rng.integers(0, 3)
    base = rng.integers(150, 256, 3).astype(np.float32)
    if kind == 0:  # plain, light
        canvas = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == 1:  # gradient between two light colours
        other = rng.integers(120, 256, 3).astype(np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)
        t = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        canvas = base * (1 - t) + other * t
        canvas = np.broadcast_to(canvas, (size, size, 3)).copy()
    else:  # light noise texture
        canvas = base + rng.normal(0, 18, (size, size, 3)).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def draw_thing(draw, thing: Thing, fill) -> None:
    """Draw ``thing`` with ``fill`` (the scene's drawing, and the demo VLM training's patch masks)."""
    import math

    x, y, r = thing.cx, thing.cy, thing.radius
    if thing.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif thing.shape == "square":
        s = r * 0.85
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([(x, y - r), (x - r * 0.95, y + r * 0.8), (x + r * 0.95, y + r * 0.8)], fill=fill)
    else:  # five-pointed star
        points = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((x + rad * math.cos(angle), y + rad * math.sin(angle)))
        draw.polygon(points, fill=fill)


def _place(rng, count: int, size: int) -> list:
    """Non-overlapping (cx, cy, radius) for ``count`` objects, radii small or large (``SMALL_RADII``, ``LARGE_RADII``)."""
    placed = []
    for _ in range(200):
        if len(placed) == count:
            break
        radius = float(rng.uniform(*SMALL_RADII) if rng.random() < 0.5 else rng.uniform(*LARGE_RADII))
        cx, cy = (float(v) for v in rng.uniform(radius + 4, size - radius - 4, 2))
        if all((cx - x) ** 2 + (cy - y) ** 2 > (radius + r + 8) ** 2 for x, y, r in placed):
            placed.append((cx, cy, radius))
    return placed


def make_scene(rng, size: int = SIZE) -> Scene:
    """One image (1-4 objects) and every unambiguous question about it."""
    import numpy as np
    from PIL import Image, ImageDraw

    count = int(rng.integers(1, 5))
    spots = _place(rng, count, size)
    things = []
    for cx, cy, radius in spots:
        things.append(Thing(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))], cx, cy, radius))
    canvas = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(canvas)
    for thing in things:
        jitter = rng.integers(-20, 21, 3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[thing.color], jitter))
        draw_thing(draw, thing, fill)
    return Scene(canvas, things, questions_for(things, rng, size))


def questions_for(things: list, rng, size: int = SIZE) -> list:
    """Every question type that this scene answers unambiguously (one per type, chosen at random)."""
    out = []
    shapes = [t.shape for t in things]
    colors = [t.color for t in things]
    unique_shape = [t for t in things if shapes.count(t.shape) == 1]
    unique_color = [t for t in things if colors.count(t.color) == 1]
    if unique_shape:
        t = unique_shape[rng.integers(len(unique_shape))]
        out.append(Question(f"What color is the {t.shape}?", t.color, "color"))
    if unique_color:
        t = unique_color[rng.integers(len(unique_color))]
        out.append(Question(f"What shape is the {t.color} object?", t.shape, "shape"))
    if rng.random() < 0.5:
        out.append(Question("How many objects are there?", str(len(things)), "count"))
    else:
        shape = SHAPES[rng.integers(len(SHAPES))]
        out.append(Question(f"How many {shape}s are there?", str(shapes.count(shape)), "count"))
    present = {(t.color, t.shape) for t in things}
    if rng.random() < 0.5:
        color, shape = sorted(present)[rng.integers(len(present))]
        answer = "yes"
    else:  # an absent pair, adversarial as POPE's: its colour or its shape is in the scene when possible
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c in colors or s in shapes)]
        color, shape = absent[rng.integers(len(absent))]
        answer = "no"
    out.append(Question(f"Is there {article(color)} {color} {shape}?", answer, "exists"))
    names = [t.name for t in things]
    nameable = [t for t in things if names.count(t.name) == 1]
    if nameable:
        t = nameable[rng.integers(len(nameable))]
        if rng.random() < 0.5 and t.side(size):
            out.append(Question(f"Is the {t.name} on the left or on the right?", t.side(size), "position"))
        elif t.height(size):
            out.append(Question(f"Is the {t.name} at the top or at the bottom?", t.height(size), "position"))
    pairs = [(a, b) for a in unique_shape for b in unique_shape if a.radius > 1.6 * b.radius]  # named by shape alone
    if pairs:
        a, b = pairs[rng.integers(len(pairs))]
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        out.append(Question(f"Which is bigger, the {first.shape} or the {second.shape}?", a.shape, "size"))
    return out


CAPTION_QUESTION = "What is in the picture?"


def caption(things: list) -> str:
    """Every object, left to right: "a red circle, a blue star and a green square" (the demo VLM's training also
    asks for this, so every object of an image gets a label, not only the one a question names)."""
    names = [f"{article(t.color)} {t.color} {t.shape}" for t in sorted(things, key=lambda t: t.cx)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def scenes(count: int, seed: int, size: int = SIZE):
    """``count`` scenes from one seeded stream (the same seed always gives the same scenes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield make_scene(rng, size)


def write_question_file(directory: str | Path, images: int, seed: int = EVAL_SEED, per_image: int | None = None) -> Path:
    """Write ``images`` scenes as PNGs and their questions as a LLaVA question file (``questions.jsonl``: one
    ``{"question_id", "image", "text", "answer", "category"}`` per line) in ``directory``; returns the file.
    ``per_image`` caps the questions kept per image (chosen at random, seeded)."""
    import numpy as np

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    pick = np.random.default_rng(seed + 1000)
    lines = []
    for i, scene in enumerate(scenes(images, seed)):
        name = f"images/{i:05d}.png"
        scene.image.save(directory / name)
        questions = list(scene.questions)
        if per_image is not None and len(questions) > per_image:
            questions = [questions[j] for j in sorted(pick.choice(len(questions), per_image, replace=False))]
        for j, q in enumerate(questions):
            lines.append({"question_id": f"{i:05d}-{j}", "image": name, "text": q.text, "answer": q.answer,
                          "category": q.category})
    path = directory / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
