"""Answer-level evidence for the README: the demo VLM's accuracy with all 256 tokens, PruMerge, PruMerge+ and an
INT8 vision graph, with visual tokens and TTFT for each, on both splits of the question language: the held-out
wordings and scene style (never trained on; every artifact) and the trained wordings (the fp32 artifacts), one
`prumerge-export evaluate` run each, printed side by side.

Builds (through the CLI, as a user would) the demo checkpoint, an artifact with PruMerge + the unreduced baseline,
one with PruMerge+, and two INT8 PruMerge artifacts (static, calibrated on 64 generated training-stream scenes, and
per-token, compared on them); writes the
two evaluation sets from a seed used nowhere in training (``shapes_qa.EVAL_SEED``) and a POPE-style yes/no file
from the held-out one; runs `evaluate` over every configuration and prints each command it ran. Outputs land in ``--work``
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

    args.docs.mkdir(parents=True, exist_ok=True)
    # both splits of the language, one evaluate run each: the held-out wordings and scene style (never trained on;
    # what a new user's questions resemble) with every artifact, the trained wordings with the fp32 ones
    reports = {}
    for split, outputs, chosen in (("heldout", ("evaluate-demo.json", "evaluate-demo.png"), artifacts),
                                   ("train", ("evaluate-demo-trained.json", None), artifacts[:2])):
        evalset = work / f"evalset-{split}"
        if not (evalset / "questions.jsonl").is_file():
            shapes_qa.write_question_file(evalset, args.scenes, seed=shapes_qa.EVAL_SEED, split=split)
        plot = ["--plot", str(args.docs / outputs[1])] if outputs[1] else []
        sh("prumerge-export", "evaluate", *map(str, chosen), "--questions", str(evalset / "questions.jsonl"),
           "--out", str(work / f"answers-{split}"), "--json", str(args.docs / outputs[0]), *plot)
        reports[split] = json.loads((args.docs / outputs[0]).read_text())
    evalset = work / "evalset-heldout"
    for ratio in ("0.97", "0.90"):  # choosing by budget: answered from the answer files just written (no model runs)
        command = ["prumerge-export", "evaluate", *map(str, artifacts), "--questions", str(evalset / "questions.jsonl"),
                   "--out", str(work / "answers-heldout"), "--min-accuracy-ratio", ratio]
        print("$ " + shlex.join(command), flush=True)
        subprocess.run(command)
    pope = evalset / "pope.jsonl"  # POPE-style: the held-out split's yes/no questions (adversarial negatives)
    lines = [{**json.loads(line), "category": "adversarial"} for line in (evalset / "questions.jsonl").read_text().splitlines()
             if json.loads(line)["answer"] in ("yes", "no")]
    pope.write_text("".join(json.dumps({**line, "question_id": f"pope-{line['question_id']}"}) + "\n" for line in lines))
    sh("prumerge-export", "evaluate", *map(str, artifacts), "--questions", str(pope), "--out", str(work / "answers-pope"),
       "--json", str(args.docs / "evaluate-demo-pope.json"))
    print(side_by_side(reports))
    if not args.no_pictures:
        pictures(work, demo, plus, args.docs)


def side_by_side(reports: dict) -> str:
    """Accuracy and x full per configuration, one column pair per split (the README's table)."""
    labels = [r["configuration"] for r in reports["heldout"]["configurations"]]
    head = "| configuration | " + " | ".join(f"{s} accuracy | {s} x full" for s in reports) + " |"
    rows = [head, "|---|" + "---:|" * (2 * len(reports))]
    for label in labels:
        cells = []
        for report in reports.values():
            row = next((r for r in report["configurations"] if r["configuration"] == label), {})
            cells += [f"{row['accuracy']:.3f} ({row['questions']} q)" if "accuracy" in row else "-",
                      f"{row['accuracy_ratio']:.3f}" if "accuracy_ratio" in row else "-"]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


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
