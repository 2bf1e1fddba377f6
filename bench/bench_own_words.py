"""The new user's check from the answers issue, as a bench: pictures drawn by another program than the demo's
generator and questions in a user's own words, through `prumerge-export evaluate`.

The pictures: one to three circles or squares of one colour on a plain light background, 336 px, drawn here with PIL
alone (not ``shapes_qa``'s drawing code, sizes, placement or backgrounds). The questions, 20 pictures each: "What
color are the shapes? Answer with one word." and "How many shapes are there? Answer with one word." — the two
the issue's user asked (3 of 40 right with all tokens before the held-out-wording retraining).

Usage: python bench/bench_own_words.py ARTIFACT [ARTIFACT ...] [--work /tmp/prumerge-own-words] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path

COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (235, 210, 30),
           "purple": (130, 50, 170), "orange": (245, 130, 20)}
QUESTIONS = (("What color are the shapes? Answer with one word.", "color"),
             ("How many shapes are there? Answer with one word.", "count"))


def draw(directory: Path, pictures: int = 20, seed: int = 2026) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(pictures):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        count = int(rng.integers(1, 4))
        image = Image.new("RGB", (336, 336), tuple(int(v) for v in rng.integers(225, 256, 3)))
        canvas = ImageDraw.Draw(image)
        boxes = []
        while len(boxes) < count:
            r = int(rng.integers(22, 48))
            x, y = (int(v) for v in rng.integers(r + 8, 336 - r - 8, 2))
            if all(abs(x - bx) > r + br + 10 or abs(y - by) > r + br + 10 for bx, by, br in boxes):
                boxes.append((x, y, r))
                shape = canvas.ellipse if rng.random() < 0.5 else canvas.rectangle
                shape((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        name = f"images/{i:03d}.png"
        image.save(directory / name)
        for j, (text, category) in enumerate(QUESTIONS):
            lines.append({"question_id": f"{i:03d}-{j}", "image": name, "text": text, "category": category,
                          "answer": colour if category == "color" else str(count)})
    path = directory / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prumerge-own-words"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    questions = draw(args.work / "set")
    command = ["prumerge-export", "evaluate", *map(str, args.artifacts), "--questions", str(questions),
               "--out", str(args.work / "answers"), "--json", str(args.json or args.work / "report.json")]
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
