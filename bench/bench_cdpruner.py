"""CDPruner (the question decides what is kept) beside DivPrune, VisionZip, PruMerge and PruMerge+ where users decide:
one `prumerge-export evaluate` run of the demo VLM over its held-out-wording questions (`evalset-heldout`), the
fixed-count methods built at equal budgets (34 and 64 tokens by default), every method inside the same exported
graph and contract, TTFT measured side by side; then `profile` on eight of the evaluation images gives each
method's reducer time (one `profile` per budget).

CDPruner's relevance reads the question in the LLM's own embedding space (the demo's tower has no CLIP text side):
``--signs negated,positive`` builds both signs of the relevance at the first budget, to decide by measurement which
the demo should use (the released rule is negated).

Everything is built through the CLI into ``--work`` (the demo checkpoint and its PruMerge artifact with the
unreduced baseline come from ``prumerge-export demo``, as a user's first run makes them).

Last, the reducers alone: CDPruner's and DivPrune's functions exported on their own (the demo's shapes: 256 projected
tokens of width 576, a 9-row question) and timed side by side on onnxruntime (2 threads, median of 60 runs), the
ratio printed.

Usage: python bench/bench_cdpruner.py [--work /tmp/prumerge-answers] [--budgets 34,64] [--scenes 60]
       [--signs negated] [--docs docs]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench_reducers import sh, visionzip_split  # the same command echo and VisionZip budget split

HERE = Path(__file__).resolve().parent


def build(checkpoint: Path, out: Path, *flags: str) -> Path:
    if not (out / "manifest.json").is_file():
        sh("prumerge-export", "build", str(checkpoint), "--out", str(out), *flags)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/prumerge-answers"))
    parser.add_argument("--budgets", default="34,64")
    parser.add_argument("--scenes", type=int, default=60, help="evaluation images (about 4.7 questions each)")
    parser.add_argument("--signs", default="negated", help="CDPruner relevance signs to build (comma-separated)")
    parser.add_argument("--only", default=None, help="comma-separated methods to evaluate (default: all)")
    parser.add_argument("--name", default="cdpruner", help="suffix of the answer folder and docs files")
    parser.add_argument("--docs", type=Path, default=HERE.parent / "docs")
    args = parser.parse_args()

    from prumerge import shapes_qa

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    demo, checkpoint = work / "demo", work / "demo-checkpoint"
    if not (demo / "manifest.json").is_file():
        sh("prumerge-export", "demo", "--out", str(demo), "--scenes", "1")
    evalset = work / f"evalset-heldout-{args.scenes}"
    if not (evalset / "questions.jsonl").is_file():
        shapes_qa.write_question_file(evalset, images=args.scenes, seed=shapes_qa.EVAL_SEED, split="heldout")
    only = set(args.only.split(",")) if args.only else None
    wanted = lambda method: only is None or method in only  # noqa: E731
    artifacts = [demo] if wanted("prumerge") or wanted("none") else []
    if wanted("prumerge+"):
        artifacts.append(build(checkpoint, work / "demo-plus", "--method", "prumerge+"))
    per_budget = []
    for i, budget in enumerate(int(b) for b in args.budgets.split(",")):
        these = []
        if wanted("visionzip"):
            dominant, contextual = visionzip_split(budget)
            these.append(build(checkpoint, work / f"demo-visionzip-{budget}", "--method", "visionzip",
                               "--dominant-tokens", str(dominant), "--contextual-tokens", str(contextual)))
        if wanted("divprune"):
            these.append(build(checkpoint, work / f"demo-divprune-{budget}", "--method", "divprune",
                               "--diverse-tokens", str(budget)))
        if wanted("cdpruner"):
            for sign in args.signs.split(",") if i == 0 else args.signs.split(",")[:1]:
                these.append(build(checkpoint, work / f"demo-cdpruner-{sign}-{budget}", "--method", "cdpruner",
                                   "--kept-tokens", str(budget), "--relevance-sign", sign))
        artifacts += these
        per_budget.append((budget, these))
    args.docs.mkdir(parents=True, exist_ok=True)
    sh("prumerge-export", "evaluate", *map(str, artifacts), "--questions", str(evalset / "questions.jsonl"),
       "--out", str(work / f"answers-{args.name}"), "--json", str(args.docs / f"evaluate-{args.name}.json"),
       "--plot", str(args.docs / f"evaluate-{args.name}.png"))
    images = [arg for path in sorted((evalset / "images").iterdir())[:8] for arg in ("--images", str(path))]
    for budget, these in per_budget:
        if these:
            sh("prumerge-export", "profile", *map(str, these), *images, "--runs", "3", "--max-new-tokens", "1",
               "--prompt", "<image>\nWhat colour is the circle?",
               "--json", str(args.docs / f"profile-{args.name}-{budget}.json"))
    reducers_alone([budget for budget, _ in per_budget])


def reducers_alone(budgets, threads: int = 2, runs: int = 60) -> None:
    """CDPruner's and DivPrune's reducer functions exported alone and timed side by side on onnxruntime."""
    import logging
    import statistics
    import tempfile
    import time
    import warnings

    import onnxruntime as ort
    import torch

    from prumerge.reduce.divprune import divprune_indices
    from prumerge.reduce.methods.cdpruner import cdpruner_indices

    class CDPruner(torch.nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.keep = keep

        def forward(self, tokens, question, mask):
            return cdpruner_indices(tokens, question, mask, self.keep)[0]

    class DivPrune(CDPruner):
        def forward(self, tokens):
            return divprune_indices(tokens, self.keep)

    warnings.simplefilter("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    g = torch.Generator().manual_seed(0)
    tokens, question = torch.randn(1, 256, 576, generator=g), torch.randn(1, 9, 576, generator=g)
    with tempfile.TemporaryDirectory() as scratch:
        for keep in budgets:
            sessions = {}
            for name, module, args in (("cdpruner", CDPruner(keep), (tokens, question, torch.ones(1, 9))),
                                       ("divprune", DivPrune(keep), (tokens,))):
                path = f"{scratch}/{name}-{keep}.onnx"
                torch.onnx.export(module, args, dynamo=True, opset_version=18).save(path)
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                sessions[name] = (session, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
            times = {name: [] for name in sessions}
            for _ in range(runs):  # alternated, so both see the same machine
                for name, (session, feed) in sessions.items():
                    start = time.perf_counter()
                    session.run(None, feed)
                    times[name].append((time.perf_counter() - start) * 1e3)
            cd, dp = (statistics.median(times[n]) for n in ("cdpruner", "divprune"))
            print(f"reducer alone at {keep} tokens: CDPruner {cd:.2f} ms, DivPrune {dp:.2f} ms = {cd / dp:.2f}x", flush=True)


if __name__ == "__main__":
    main()
