"""The decoder's KV cache, float vs mixed (int8 cache, float first step: the default since issue 39), side by side:
answers on the demo VLM's held-out-wording questions, then decode and prefill against llama.cpp.

Builds the demo checkpoint twice with ``--baseline`` (``--llm-kv-cache float`` and ``mixed``), runs one
``prumerge-export evaluate`` over both (methods none and prumerge: 256 and ~38 visual tokens a prompt), writes
``docs/evaluate-kv-cache.json``, then ``bench_llamacpp.py --artifact MIXED --also FLOAT`` (llama-cpp-python is a bench
dependency; without it that part says so). The demo checkpoint is ``prumerge-export demo``'s (``--work`` holds it as
``demo-checkpoint``, and the held-out question file as ``evalset-heldout-60``, as ``bench_cdpruner.py`` makes them).

Usage: python bench/bench_kv_cache.py [--work /tmp/prumerge-answers]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/prumerge-answers"))
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--docs", type=Path, default=HERE.parent / "docs")
    args = parser.parse_args()

    from prumerge import shapes_qa

    work, checkpoint = args.work, args.work / "demo-checkpoint"
    if not (checkpoint / "config.json").is_file():
        sh("prumerge-export", "demo", "--out", str(work / "demo"), "--scenes", "1")
    evalset = work / f"evalset-heldout-{args.scenes}"
    if not (evalset / "questions.jsonl").is_file():
        shapes_qa.write_question_file(evalset, images=args.scenes, seed=shapes_qa.EVAL_SEED, split="heldout")
    artifacts = []
    for cache in ("float", "mixed"):
        out = work / f"demo-kv-{cache}"
        if not (out / "manifest.json").is_file():
            sh("prumerge-export", "build", str(checkpoint), "--out", str(out), "--baseline", "--llm-kv-cache", cache)
        artifacts.append(str(out))
    args.docs.mkdir(parents=True, exist_ok=True)
    sh("prumerge-export", "evaluate", *artifacts, "--methods", "none,prumerge", "--questions",
       str(evalset / "questions.jsonl"), "--out", str(work / "answers-kv-cache"),
       "--json", str(args.docs / "evaluate-kv-cache.json"))
    sh(sys.executable, str(HERE / "bench_llamacpp.py"), "--artifact", artifacts[1], "--also", artifacts[0])


if __name__ == "__main__":
    main()
