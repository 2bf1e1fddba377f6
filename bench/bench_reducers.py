"""PruMerge, PruMerge+, VisionZip and DivPrune compared where users decide: one `prumerge-export evaluate` run of
the demo VLM over its held-out-wording questions (`evalset-heldout`), VisionZip and DivPrune built at PruMerge's and PruMerge+'s mean token
counts on this set (equal budgets), every method inside the same exported graph and contract.

Reuses ``--work`` from ``bench/bench_answers.py`` (its demo checkpoint, ``demo`` artifact with the unreduced
baseline, ``demo-plus`` and evaluation set) and builds the new artifacts through the CLI. VisionZip splits a budget
as its official 64-token setting does (10 of 64 contextual). Every configuration is answered in one `evaluate` run
into a fresh answer directory (``answers-reducers``), so the TTFTs are measured side by side; then `profile` on
eight of the evaluation images gives each method's reducer time (one `profile` per budget: it takes each method
from the first artifact that has it).

Usage: python bench/bench_reducers.py [--work /tmp/prumerge-answers] [--budgets 38,171] [--docs docs]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sh(*args: str) -> None:
    print("$ " + shlex.join(args), flush=True)
    subprocess.run(args, check=True)


def visionzip_split(budget: int) -> tuple[int, int]:
    """(dominant, contextual) for ``budget`` tokens in the official 54 + 10 proportion."""
    contextual = max(1, round(budget * 10 / 64))
    return budget - contextual, contextual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/prumerge-answers"))
    parser.add_argument("--budgets", default="38,171", help="token budgets (default: PruMerge's and PruMerge+'s means)")
    parser.add_argument("--docs", type=Path, default=HERE.parent / "docs")
    args = parser.parse_args()
    work, checkpoint = args.work, args.work / "demo-checkpoint"
    for needed in (checkpoint, work / "demo" / "manifest.json", work / "demo-plus" / "manifest.json",
                   work / "evalset-heldout" / "questions.jsonl"):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run python bench/bench_answers.py --work {work} first")
    artifacts = [work / "demo", work / "demo-plus"]
    per_budget = []
    for budget in (int(b) for b in args.budgets.split(",")):
        dominant, contextual = visionzip_split(budget)
        zip_dir, div_dir = work / f"demo-visionzip-{budget}", work / f"demo-divprune-{budget}"
        if not (zip_dir / "manifest.json").is_file():
            sh("prumerge-export", "build", str(checkpoint), "--out", str(zip_dir), "--method", "visionzip",
               "--dominant-tokens", str(dominant), "--contextual-tokens", str(contextual))
        if not (div_dir / "manifest.json").is_file():
            sh("prumerge-export", "build", str(checkpoint), "--out", str(div_dir), "--method", "divprune",
               "--diverse-tokens", str(budget))
        artifacts += [zip_dir, div_dir]
        per_budget.append((budget, zip_dir, div_dir))
    args.docs.mkdir(parents=True, exist_ok=True)
    sh("prumerge-export", "evaluate", *map(str, artifacts), "--questions", str(work / "evalset-heldout" / "questions.jsonl"),
       "--out", str(work / "answers-reducers"), "--json", str(args.docs / "evaluate-reducers.json"),
       "--plot", str(args.docs / "evaluate-reducers.png"))
    images = [arg for path in sorted((work / "evalset-heldout" / "images").iterdir())[:8] for arg in ("--images", str(path))]
    for i, (budget, zip_dir, div_dir) in enumerate(per_budget):
        base = [str(work / "demo"), str(work / "demo-plus")] if i == 0 else []
        sh("prumerge-export", "profile", *base, str(zip_dir), str(div_dir), *images, "--runs", "3",
           "--max-new-tokens", "1", "--json", str(args.docs / f"profile-reducers-{budget}.json"))


if __name__ == "__main__":
    main()
