"""A second question on the same image: the tower once (CDPruner's reducer graph alone on the kept patch outputs)
against the whole vision graph again, side by side on the demo VLM.

Builds the demo checkpoint with ``--method cdpruner --kept-tokens 64`` (the default LLM: int4, mixed KV cache),
then for each of ``--images`` held-out evaluation images asks a first question, then a second one twice, alternating
which path goes first: through the pipeline that kept the image's patch outputs (the reducer graph alone) and
through one whose reducer graph is switched off (the whole graph again). Prints the median vision time and TTFT of
each (one greedy token: TTFT is preprocessing + vision + prefill), and whether the two paths answered alike.

Usage: python bench/bench_second_question.py [--work /tmp/prumerge-answers] [--images 12]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path

QUESTIONS = ("<image>\nWhat color is the circle?", "<image>\nHow many shapes are there in the image?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/prumerge-answers"))
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from PIL import Image

    from prumerge import shapes_qa
    from prumerge.runtime.pipeline import Pipeline, SamplingParams

    artifact = args.work / "demo-cdpruner-reuse-64"
    if not (artifact / "manifest.json").is_file():
        subprocess.run(["prumerge-export", "build", str(args.work / "demo-checkpoint"), "--out", str(artifact),
                        "--method", "cdpruner", "--kept-tokens", "64"], check=True)
    evalset = args.work / "evalset-heldout-60"
    if not (evalset / "questions.jsonl").is_file():
        shapes_qa.write_question_file(evalset, images=60, seed=shapes_qa.EVAL_SEED, split="heldout")
    images = [Image.open(p).convert("RGB") for p in sorted((evalset / "images").iterdir())[: args.images]]
    reusing = Pipeline.from_artifacts(artifact, llm_threads=args.threads)
    whole = Pipeline.from_artifacts(artifact, llm_threads=args.threads)
    whole.vision.reducer = None  # every question runs the whole vision graph
    one = SamplingParams(1)
    rows = {"first question": [], "second, reducer graph alone": [], "second, whole graph again": []}
    same = 0
    for i, image in enumerate(images):
        reusing.generate(image, QUESTIONS[0], sampling=one) if i == 0 else None  # warm-up
        rows["first question"].append(reusing.generate(image, QUESTIONS[0], sampling=one).timings_ms)
        pair = [("second, reducer graph alone", reusing), ("second, whole graph again", whole)]
        results = {}
        for name, pipeline in (pair if i % 2 == 0 else pair[::-1]):  # alternated: both see the same machine
            result = pipeline.generate(image, QUESTIONS[1], sampling=one)
            rows[name].append(result.timings_ms)
            results[name] = result.token_ids
        same += len({tuple(v) for v in results.values()}) == 1
    print(f"{artifact.name}: {len(images)} images, {args.threads} threads, one greedy token (TTFT)")
    print("| | vision ms p50 | TTFT ms p50 |\n|---|---:|---:|")
    for name, timings in rows.items():
        print(f"| {name} | {statistics.median(t['vision'] for t in timings):.1f} | "
              f"{statistics.median(t['ttft'] for t in timings):.1f} |")
    vision = [statistics.median(t["vision"] for t in rows[n]) for n in list(rows)[1:]]
    print(f"second question: vision {vision[1] / vision[0]:.1f}x faster with the reducer graph alone; "
          f"the same first token on {same} of {len(images)} images")


if __name__ == "__main__":
    main()
