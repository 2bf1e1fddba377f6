"""A procedurally generated visual question-answering set: coloured shapes on varied backgrounds, with questions
whose answers are one word (a colour, a shape, a number, yes/no, left/right/top/bottom).

Why it exists: no LLaVA weights or VQA data are available offline, yet the toolkit's users ask an answer-level
question first (how much accuracy does PruMerge cost?). The demo VLM is trained on this set (``demovlm.train``) and
evaluated on another seed of it (``prumerge-export evaluate``), so the evaluation images are never seen in training.
numpy + PIL only: the device side can write an evaluation set too.

**Two splits of the language, one of the pictures** (why: a model trained on one sentence per question type learns
sentence -> answer type, and a user who words a question differently gets a caption back). Every question type is
written in many wordings (``WORDINGS``: synonyms, singular and plural, "Count the ...", "Tell me ...", with and
without a short-answer instruction, LLaVA's "Answer the question using a single word or phrase." among them). About
a third of each type's wordings, some of the instructions, and one scene style (a checkerboard background drawn at
336 px, ``HELDOUT_STYLE``) are **held out**: training draws from the ``"train"`` split only; the ``"heldout"`` split
asks only held-out wordings, half of its pictures in the held-out style. Figures say which split they come from.

Every question is answerable from the image alone and unambiguous: a question names an object only by attributes
that are unique in its scene, positions are asked only when the object is clearly on one side, sizes only when the
two objects differ clearly, "what colour are the shapes" only when they all share one.
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
MAX_OBJECTS = 5
CATEGORIES = ("color", "shape", "count", "exists", "position", "size")
SMALL_RADII, LARGE_RADII = (12.0, 20.0), (28.0, 40.0)  # at SIZE px; two clearly different sizes: "big" is the second
POSITION_MARGIN = 0.12  # an object is on a side only when its centre is this share of the image away from the middle
# disjoint streams: training; held-out (watched during training); evaluation (used nowhere in training)
TRAIN_SEED, HELDOUT_SEED, EVAL_SEED = 1, 2, 4
SPLITS = ("train", "heldout")
TRAIN_STYLES = ("plain", "gradient", "noise", "stripes")
HELDOUT_STYLE, HELDOUT_STYLE_SIZE = "checker", 336  # never drawn for training; half of the held-out split's pictures

# The generic nouns a question may call an object by (singular, plural).
NOUNS = (("object", "objects"), ("shape", "shapes"), ("thing", "things"), ("item", "items"))

# Per question type: (template, split). Fields: {shape} {color} {name} ("red circle") {noun}/{nouns} (a generic
# noun, singular/plural) {be} {do} ("is"/"are", "does"/"do" for {nouns}) {a} (the article before {color}) {x} {y} (the two options,
# in either order) {first} {second} (the two shapes compared). Each type holds out at least a third.
T, H = "train", "heldout"
WORDINGS = {
    "color": (  # one object, named by its unique shape
        ("What color is the {shape}?", T), ("What colour is the {shape}?", T), ("Which color is the {shape}?", T),
        ("What is the color of the {shape}?", T), ("Tell me the color of the {shape}.", T),
        ("The {shape} is what color?", T), ("Name the colour of the {shape}.", T),
        ("What color does the {shape} have?", T), ("Can you tell me what color the {shape} is?", T),
        ("What's the colour of the {shape}?", T), ("Identify the color of the {shape}.", T),
        ("What color is the {shape} in the image?", H), ("Which colour does the {shape} have?", H),
        ("What is the {shape}'s color?", H), ("Say what colour the {shape} is.", H),
        ("Could you name the color of the {shape}?", H), ("What color has the {shape} been painted?", H),
    ),
    "color_all": (  # every object shares one colour: "what colour are the shapes"
        ("What color {be} the {nouns}?", T), ("What colour {be} the {nouns}?", T),
        ("Which color {be} the {nouns}?", T), ("What is the color of the {nouns}?", T),
        ("Tell me the colour of the {nouns}.", T), ("Name the color of the {nouns}.", T),
        ("What color {be} the {nouns} in the picture?", H), ("Which colour {do} the {nouns} have?", H),
        ("Say what color the {nouns} {be}.", H),
    ),
    "shape": (  # one object, named by its unique colour
        ("What shape is the {color} {noun}?", T), ("Which shape is the {color} {noun}?", T),
        ("What is the shape of the {color} {noun}?", T), ("Tell me the shape of the {color} {noun}.", T),
        ("What kind of shape is the {color} {noun}?", T), ("Name the shape of the {color} {noun}.", T),
        ("What shape does the {color} {noun} have?", T), ("The {color} {noun} is what shape?", T),
        ("What is the {color} {noun}?", T), ("Identify the shape of the {color} {noun}.", T),
        ("What's the {color} {noun}'s shape?", T),
        ("Which shape does the {color} {noun} have?", H), ("What form does the {color} {noun} have?", H),
        ("Could you tell me what shape the {color} {noun} is?", H), ("Describe the shape of the {color} {noun}.", H),
        ("What is the shape of the {color} {noun} in the image?", H), ("What type of shape is the {color} one?", H),
    ),
    "count": (  # {nouns}: every object ("objects", "shapes", ...) or one shape ("circles")
        ("How many {nouns} are there?", T), ("How many {nouns} are in the image?", T), ("Count the {nouns}.", T),
        ("How many {nouns} can you see?", T), ("What is the number of {nouns}?", T),
        ("How many {nouns} does the picture show?", T), ("Count the {nouns} in the picture.", T),
        ("How many {nouns} are shown?", T), ("Tell me how many {nouns} there are.", T), ("Number of {nouns}?", T),
        ("How many {nouns} do you see?", T),
        ("How many {nouns} are in the picture?", H), ("What's the number of {nouns} in the image?", H),
        ("Can you count the {nouns}?", H), ("How many {nouns} are visible?", H),
        ("Count how many {nouns} there are.", H), ("How many {nouns} appear in the image?", H),
    ),
    "exists": (
        ("Is there {a} {color} {shape}?", T), ("Is there {a} {color} {shape} in the image?", T),
        ("Do you see {a} {color} {shape}?", T), ("Does the image contain {a} {color} {shape}?", T),
        ("Is {a} {color} {shape} present?", T), ("Can you see {a} {color} {shape}?", T),
        ("Is there any {color} {shape}?", T), ("Does the picture have {a} {color} {shape}?", T),
        ("Is {a} {color} {shape} shown?", T), ("Is there {a} {color} {shape} anywhere?", T),
        ("Are there any {color} {shape}s?", T),
        ("Is there {a} {color} {shape} in the picture?", H), ("Do you spot {a} {color} {shape}?", H),
        ("Does this image show {a} {color} {shape}?", H), ("Can {a} {color} {shape} be seen?", H),
        ("Is {a} {color} {shape} visible?", H), ("Would I find {a} {color} {shape} here?", H),
    ),
    "side": (  # position, left/right
        ("Is the {name} on the {x} or on the {y}?", T), ("Is the {name} on the {x} or the {y}?", T),
        ("Is the {name} {x} or {y}?", T), ("On which side is the {name}, {x} or {y}?", T),
        ("Which side is the {name} on, {x} or {y}?", T), ("Is the {name} on the {x} side or the {y} side?", T),
        ("Where is the {name}, on the {x} or on the {y}?", H), ("{X} or {y}: where is the {name}?", H),
        ("Does the {name} sit on the {x} or on the {y}?", H),
    ),
    "height": (  # position, top/bottom
        ("Is the {name} at the {x} or at the {y}?", T), ("Is the {name} at the {x} or the {y}?", T),
        ("Is the {name} in the {x} half or the {y} half?", T), ("Which half is the {name} in, {x} or {y}?", T),
        ("Is the {name} near the {x} or near the {y}?", T), ("Is the {name} {x} or {y}?", T),
        ("Where is the {name}, at the {x} or at the {y}?", H), ("{X} or {y}: where is the {name}?", H),
        ("Is the {name} closer to the {x} or to the {y}?", H),
    ),
    "bigger": (  # size: the bigger of two
        ("Which is bigger, the {first} or the {second}?", T), ("Which is larger, the {first} or the {second}?", T),
        ("Which one is bigger: the {first} or the {second}?", T),
        ("Which of the two is larger, the {first} or the {second}?", T),
        ("Which is the bigger shape, the {first} or the {second}?", T), ("Is the {first} or the {second} bigger?", T),
        ("Which takes up more space, the {first} or the {second}?", T),
        ("Which is larger: the {first} or the {second}?", H),
        ("Between the {first} and the {second}, which is bigger?", H),
        ("Which appears larger, the {first} or the {second}?", H),
    ),
    "smaller": (  # size: the smaller of two
        ("Which is smaller, the {first} or the {second}?", T),
        ("Which is the smaller one, the {first} or the {second}?", T),
        ("Between the {first} and the {second}, which is smaller?", T), ("Which is tinier, the {first} or the {second}?", T),
        ("Is the {first} or the {second} smaller?", H),
        ("Which of the two is smaller, the {first} or the {second}?", H),
    ),
}
CATEGORY_OF = {"color": "color", "color_all": "color", "shape": "shape", "count": "count", "exists": "exists",
               "side": "position", "height": "position", "bigger": "size", "smaller": "size"}
# short-answer instructions put after a question (or none): LLaVA's own is trained on
INSTRUCTIONS = (
    ("Answer the question using a single word or phrase.", T), ("Answer in one word.", T),
    ("Reply with one word.", T), ("Give a short answer.", T), ("Use a single word.", T),
    ("Answer with one word.", H), ("One word only.", H), ("Please answer briefly.", H),
)
INSTRUCTED_SHARE = 0.5  # of questions that carry an instruction


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

    def big(self, size: int = SIZE) -> bool:
        return self.radius * SIZE / size >= LARGE_RADII[0]

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
    kind: str = ""  # the WORDINGS key it was written from ("color_all", "side", ...)


@dataclasses.dataclass
class Scene:
    image: object  # PIL.Image
    things: list
    questions: list
    style: str = "plain"


def wordings(kind: str, split: str) -> tuple:
    """The templates of question type ``kind`` in ``split``."""
    return tuple(text for text, where in WORDINGS[kind] if where == split)


def _background(rng, size: int, style: str):
    import numpy as np

    base = rng.integers(150, 256, 3).astype(np.float32)
    if style == "plain":  # plain, light
        canvas = np.broadcast_to(base, (size, size, 3)).copy()
    elif style == "gradient":  # between two light colours
        other = rng.integers(120, 256, 3).astype(np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)
        t = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        canvas = np.broadcast_to(base * (1 - t) + other * t, (size, size, 3)).copy()
    elif style == "noise":  # light noise texture
        canvas = base + rng.normal(0, 18, (size, size, 3)).astype(np.float32)
    elif style in ("stripes", "checker"):  # two light tones in bands (training) or squares (held out)
        other = np.clip(base + rng.integers(-45, 46, 3), 120, 255).astype(np.float32)
        period = int(rng.integers(size // 10, size // 4))
        ramp = (np.arange(size) // period) % 2
        mask = ramp[None, :] ^ ramp[:, None] if style == "checker" else np.broadcast_to(ramp[None, :], (size, size))
        if style == "stripes" and rng.random() < 0.5:
            mask = mask.T
        canvas = np.where(mask[..., None] == 1, other, base)
    else:
        raise ValueError(f"unknown scene style {style!r}")
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
    """Non-overlapping (cx, cy, radius) for ``count`` objects, radii small or large (``SMALL_RADII``, ``LARGE_RADII``,
    scaled to ``size``)."""
    scale, placed = size / SIZE, []
    for _ in range(200):
        if len(placed) == count:
            break
        radius = scale * float(rng.uniform(*SMALL_RADII) if rng.random() < 0.5 else rng.uniform(*LARGE_RADII))
        cx, cy = (float(v) for v in rng.uniform(radius + 4 * scale, size - radius - 4 * scale, 2))
        if all((cx - x) ** 2 + (cy - y) ** 2 > (radius + r + 8 * scale) ** 2 for x, y, r in placed):
            placed.append((cx, cy, radius))
    return placed


def make_scene(rng, size: int = SIZE, split: str = "train", style: str | None = None) -> Scene:
    """One image (1-5 objects; a quarter of them all of one colour) and every unambiguous question about it, worded
    from ``split``'s templates. ``style``: the background (default: one of ``TRAIN_STYLES`` at random)."""
    import numpy as np
    from PIL import Image, ImageDraw

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    style = style or TRAIN_STYLES[rng.integers(len(TRAIN_STYLES))]
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    spots = _place(rng, count, size)
    one_colour = list(COLORS)[rng.integers(len(COLORS))] if rng.random() < 0.25 else None
    things = []
    for cx, cy, radius in spots:
        colour = one_colour or list(COLORS)[rng.integers(len(COLORS))]
        things.append(Thing(SHAPES[rng.integers(len(SHAPES))], colour, cx, cy, radius))
    canvas = Image.fromarray(_background(rng, size, style))
    draw = ImageDraw.Draw(canvas)
    for thing in things:
        jitter = rng.integers(-20, 21, 3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[thing.color], jitter))
        draw_thing(draw, thing, fill)
    return Scene(canvas, things, questions_for(things, rng, size, split), style)


class _Writer:
    """Words one question of a type from ``split``'s templates, with or without a short-answer instruction."""

    def __init__(self, rng, split: str) -> None:
        self.rng, self.split = rng, split
        self.instructions = [text for text, where in INSTRUCTIONS if where == split]

    def pick(self, items):
        return items[self.rng.integers(len(items))]

    def __call__(self, kind: str, answer: str, **fields) -> Question:
        singular, plural = self.pick(NOUNS)
        fields.setdefault("noun", singular)
        if "x" in fields and self.rng.random() < 0.5:
            fields["x"], fields["y"] = fields["y"], fields["x"]
        if "x" in fields:
            fields["X"] = fields["x"].capitalize()
        if "color" in fields:
            fields["a"] = article(fields["color"])
        text = self.pick(wordings(kind, self.split)).format(**fields)
        if self.rng.random() < INSTRUCTED_SHARE:
            text = f"{text} {self.pick(self.instructions)}"
        return Question(text, answer, CATEGORY_OF[kind], kind)


def questions_for(things: list, rng, size: int = SIZE, split: str = "train") -> list:
    """Every question type that this scene answers unambiguously (one per type, its wording chosen at random)."""
    write = _Writer(rng, split)
    out = []
    shapes = [t.shape for t in things]
    colors = [t.color for t in things]
    unique_shape = [t for t in things if shapes.count(t.shape) == 1]
    unique_color = [t for t in things if colors.count(t.color) == 1]
    if len(set(colors)) == 1 and (not unique_shape or rng.random() < 0.5):  # "what colour are the shapes"
        singular, plural = write.pick(NOUNS)
        many = len(things) > 1
        out.append(write("color_all", colors[0], nouns=plural if many else singular, be="are" if many else "is",
                         do="do" if many else "does"))
    elif unique_shape:
        t = write.pick(unique_shape)
        out.append(write("color", t.color, shape=t.shape))
    if unique_color:
        t = write.pick(unique_color)
        out.append(write("shape", t.shape, color=t.color))
    if rng.random() < 0.5:
        out.append(write("count", str(len(things)), nouns=write.pick(NOUNS)[1]))
    else:
        shape = write.pick(SHAPES)
        out.append(write("count", str(shapes.count(shape)), nouns=f"{shape}s"))
    present = {(t.color, t.shape) for t in things}
    if rng.random() < 0.5:
        color, shape = sorted(present)[rng.integers(len(present))]
        answer = "yes"
    else:  # an absent pair, adversarial as POPE's: its colour or its shape is in the scene when possible
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c in colors or s in shapes)]
        color, shape = absent[rng.integers(len(absent))]
        answer = "no"
    out.append(write("exists", answer, color=color, shape=shape))
    names = [t.name for t in things]
    nameable = [t for t in things if names.count(t.name) == 1]
    if nameable:
        t = write.pick(nameable)
        if rng.random() < 0.5 and t.side(size):
            out.append(write("side", t.side(size), name=t.name, x="left", y="right"))
        elif t.height(size):
            out.append(write("height", t.height(size), name=t.name, x="top", y="bottom"))
    pairs = [(a, b) for a in unique_shape for b in unique_shape if a.radius > 1.6 * b.radius]  # named by shape alone
    if pairs:
        a, b = pairs[rng.integers(len(pairs))]
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        if rng.random() < 0.7:
            out.append(write("bigger", a.shape, first=first.shape, second=second.shape))
        else:
            out.append(write("smaller", b.shape, first=first.shape, second=second.shape))
    return out


CAPTION_QUESTION = "What is in the picture?"


def caption(things: list) -> str:
    """Every object, left to right: "a red circle, a blue star and a green square" (the demo VLM's training also
    asks for this, so every object of an image gets a label, not only the one a question names)."""
    names = [f"{article(t.color)} {t.color} {t.shape}" for t in sorted(things, key=lambda t: t.cx)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def scenes(count: int, seed: int, size: int = SIZE, split: str = "train"):
    """``count`` scenes from one seeded stream (the same seed and split always give the same scenes). The held-out
    split draws every other scene in ``HELDOUT_STYLE`` at ``HELDOUT_STYLE_SIZE`` px."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for i in range(count):
        if split == "heldout" and i % 2 == 1:
            yield make_scene(rng, HELDOUT_STYLE_SIZE, split, HELDOUT_STYLE)
        else:
            yield make_scene(rng, size, split)


def write_question_file(directory: str | Path, images: int, seed: int = EVAL_SEED, per_image: int | None = None,
                        split: str = "heldout") -> Path:
    """Write ``images`` scenes as PNGs and their questions as a LLaVA question file (``questions.jsonl``: one
    ``{"question_id", "image", "text", "answer", "category"}`` per line) in ``directory``; returns the file.
    ``per_image`` caps the questions kept per image (chosen at random, seeded). ``split``: which wordings (and scene
    styles) ask them; the default is the held-out one, the one a new user's questions resemble."""
    import numpy as np

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    pick = np.random.default_rng(seed + 1000)
    lines = []
    for i, scene in enumerate(scenes(images, seed, split=split)):
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
