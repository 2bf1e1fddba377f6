"""Answer-level evidence for the README: the demo VLM's held-out accuracy with all 256 tokens, PruMerge, PruMerge+
and an INT8 vision graph, with visual tokens and TTFT for each, from one `prumerge-export evaluate` run.

Builds (through the CLI, as a user would) the demo checkpoint, an artifact with PruMerge + the unreduced baseline,
one with PruMerge+, and two INT8 PruMerge artifacts (static, calibrated on 64 generated training-stream scenes, and
per-token, compared on them); writes an
evaluation set from a seed used nowhere in training (``shapes_qa.EVAL_SEED``) and a hand-made POPE-style yes/no
file; runs `evaluate` over every configuration and prints each command it ran. Outputs land in ``--work``
(artifacts, answer files) and ``--docs`` (the JSON summary and the accuracy-vs-TTFT PNG).

Then the README's profile table and inspect picture: the demo model on four real photos (scikit-image's).

Usage: python bench/bench_answers.py [--scenes 60] [--work /tmp/prumerge-answers] [--docs docs] [--no-int8]
       [--no-pictures]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sh(*args: str) -> None:
    print("$ " + shlex.join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=60, help="evaluation images (about 4.7 questions each)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prumerge-answers"))
    parser.add_argument("--docs", type=Path, default=HERE.parent / "docs")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--no-pictures", action="store_true", help="skip the profile table and inspect picture")
    args = parser.parse_args()

    from prumerge import shapes_qa

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    demo = work / "demo"
    if not (demo / "manifest.json").is_file():  # the README's main job builds the checkpoint and this artifact
        sh("prumerge-export", "demo", "--out", str(demo), "--scenes", "1")
    checkpoint = work / "demo-checkpoint"
    artifacts = [demo]
    plus = work / "demo-plus"
    if not (plus / "manifest.json").is_file():
        sh("prumerge-export", "build", str(checkpoint), "--out", str(plus), "--method", "prumerge+")
    artifacts.append(plus)
    if not args.no_int8:
        calib = work / "calibration-images"
        if not calib.is_dir():
            calib.mkdir()
            for i, scene in enumerate(shapes_qa.scenes(64, shapes_qa.TRAIN_SEED)):
                scene.image.save(calib / f"{i:03d}.png")
        int8 = work / "demo-int8"
        if not (int8 / "manifest.json").is_file():
            sh("prumerge-export", "calibrate", str(calib), "--model", str(checkpoint), "--out", str(work / "calibration.json"),
               "--report")
            sh("prumerge-export", "build", str(checkpoint), "--out", str(int8), "--calibration", str(work / "calibration.json"),
               "--precision", "int8")
        artifacts.append(int8)
        per_token = work / "demo-int8-per-token"  # INT8 with activation scales per token at run time (onnxruntime)
        if not (per_token / "manifest.json").is_file():
            sh("prumerge-export", "build", str(checkpoint), "--out", str(per_token), "--calibration",
               str(work / "calibration.json"), "--precision", "int8", "--calibration-method", "per-token")
        artifacts.append(per_token)

    evalset = work / "evalset"
    if not (evalset / "questions.jsonl").is_file():
        shapes_qa.write_question_file(evalset, args.scenes, seed=shapes_qa.EVAL_SEED)
    pope = evalset / "pope.jsonl"  # POPE-style: one present and one absent (adversarial) object per image
    lines = []
    for i, scene in enumerate(shapes_qa.scenes(args.scenes, shapes_qa.EVAL_SEED)):
        for j, q in enumerate(x for x in scene.questions if x.category == "exists"):
            lines.append({"question_id": f"pope-{i:05d}-{j}", "image": f"images/{i:05d}.png", "text": q.text,
                          "answer": q.answer, "category": "adversarial"})
    pope.write_text("".join(json.dumps(line) + "\n" for line in lines))

    args.docs.mkdir(parents=True, exist_ok=True)
    sh("prumerge-export", "evaluate", *map(str, artifacts), "--questions", str(evalset / "questions.jsonl"),
       "--out", str(work / "answers"), "--json", str(args.docs / "evaluate-demo.json"),
       "--plot", str(args.docs / "evaluate-demo.png"))
    for ratio in ("0.97", "0.90"):  # choosing by budget: answered from the answer files just written (no model runs)
        command = ["prumerge-export", "evaluate", *map(str, artifacts), "--questions", str(evalset / "questions.jsonl"),
                   "--out", str(work / "answers"), "--min-accuracy-ratio", ratio]
        print("$ " + shlex.join(command), flush=True)
        subprocess.run(command)
    sh("prumerge-export", "evaluate", *map(str, artifacts), "--questions", str(pope), "--out", str(work / "answers-pope"),
       "--json", str(args.docs / "evaluate-demo-pope.json"))
    if not args.no_pictures:
        pictures(work, demo, plus, args.docs)


PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")  # real photos shipped in scikit-image


def pictures(work: Path, demo: Path, plus: Path, docs: Path) -> None:
    """The README's profile table and inspect picture: the demo model on real photos."""
    import importlib.util

    folder = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    photos = [folder / name for name in PHOTOS if (folder / name).is_file()]
    images = [arg for photo in photos for arg in ("--images", str(photo))]
    sh("prumerge-export", "profile", str(demo), str(plus), *images, "--runs", "3",
       "--json", str(docs / "profile-demo.json"), "--plot", str(docs / "profile-demo.png"))
    sh("prumerge-export", "inspect", str(photos[0]), "--model", str(demo), "--method", "prumerge+",
       "--out", str(docs / "inspect-demo.png"))


if __name__ == "__main__":
    main()
