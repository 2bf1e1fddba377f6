"""Run a question file through every configuration (artifact x method) and summarise what each one costs.

A configuration is one vision graph of one artifact with that artifact's LLM: its own method, and ``none`` when it
was built with ``--baseline``. Several artifacts (an fp32 and an INT8 build, two capacities) compare side by side;
a baseline graph identical to one already listed (same file hash, same decoder) is run once. Answers are greedy,
appended to one answer file per configuration as they come, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..artifact.contract import check_method_request
from ..artifact.manifest import Manifest
from ..errors import ConfigError, InputError
from . import scoring
from .questions import EvalQuestion, answers_lock, open_answers, question_key, read_answers



@dataclasses.dataclass(frozen=True)
class Configuration:
    label: str
    artifact: Path
    method: str
    graph: str  # manifest section: vision | baseline
    sha256: str  # the artifact's manifest hash (answer files are tied to it)
    build: dict  # what the build command needs: source, method, capacity, precisions, image size

    @property
    def answer_file(self) -> str:
        """``answers-<method>[-at-<artifact folder>].jsonl``, one name per label: the method is one of a fixed set
        (``+`` spelled ``plus``), and every character of the folder name other than a letter, a digit, ``-`` or
        ``.`` is written as ``_`` and its code point in hex (``_`` itself too), so two labels never share a file."""
        method, _, folder = self.label.partition("@")
        name = method.replace("+", "plus")
        if folder:
            name += "-at-" + "".join(c if (c.isascii() and c.isalnum()) or c in "-." else f"_{ord(c):x}_" for c in folder)
        return f"answers-{name}.jsonl"


def configurations(artifacts: Sequence[str | Path], methods: Sequence[str] | None = None) -> list:
    """Every (artifact, method) pair to evaluate, in the order given; ``methods`` filters (default: all)."""
    methods = check_method_request(artifacts, methods)
    found, seen = [], set()
    for directory in artifacts:
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if manifest.llm is None or not manifest.llm.decoder:
            raise ConfigError(f"{directory} has no LLM (built with --no-llm): evaluate answers questions")
        decoder = _file_hash(manifest, manifest.llm.directory, manifest.llm.decoder)
        for section, graph in (("vision", manifest.vision), ("baseline", manifest.baseline)):
            if graph is None or (methods and graph.method not in methods):
                continue
            key = (manifest.files.get(graph.file, {}).get("sha256"), decoder)
            if key in seen:
                continue
            seen.add(key)
            found.append((directory, section, graph, manifest))
    if not found:
        raise ConfigError(f"no artifact provides {', '.join(methods)}; build one with --method for it, or --baseline for none")
    missing = [m for m in methods if m not in {g.method for _, _, g, _ in found}]
    if missing:
        raise ConfigError(f"no artifact provides {', '.join(missing)}; build one with --method for it, or --baseline for none")
    counts = {}
    for _, _, graph, _ in found:
        counts[graph.method] = counts.get(graph.method, 0) + 1
    out = []
    for directory, section, graph, manifest in found:
        label = graph.method if counts[graph.method] == 1 else f"{graph.method}@{directory.name}"
        out.append(Configuration(label, directory, graph.method, section, manifest.sha256, _build_facts(manifest, graph)))
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two artifacts share a directory name ({', '.join(labels)}); give them distinct names")
    return out


def _file_hash(manifest: Manifest, directory: str, name: str) -> str | None:
    return manifest.files.get(f"{directory}/{name}", {}).get("sha256")


def _build_facts(manifest: Manifest, graph) -> dict:
    return {"source": manifest.source.model, "revision": manifest.source.revision, "method": graph.method,
            "capacity": graph.capacity, "precision": graph.precision, "opset": graph.opset, "attention": graph.attention,
            "int8_float_layers": graph.int8.float_layers if graph.int8 else None,
            "int8_target_jaccard": graph.int8.target_jaccard if graph.int8 else None,
            "int8_calibration_method": graph.int8.calibration_method if graph.int8 else None,
            "llm_precision": manifest.llm.precision, "llm_kv_cache": manifest.llm.kv_cache_kind,
            "text_encoder": manifest.text.source if manifest.text is not None else None,
            "image_size": manifest.reducer.image_size,
            "output": graph.contract, "reducer_options": dict(manifest.reducer.options or {})}


def run(questions: Sequence[EvalQuestion], configs: Sequence[Configuration], out: Path, provider: str = "cpu",
        max_new_tokens: int = 16, progress: Callable[[str, int], None] | None = None) -> dict:
    """Answer every question with every configuration (resuming from ``out``'s answer files); returns
    ``{label: {question_id: answer record}}``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot make the folder ({exc.strerror})") from None
    with answers_lock(out):
        return _answer(questions, configs, out, provider, max_new_tokens, progress)


def _answer(questions, configs, out: Path, provider: str, max_new_tokens: int, progress) -> dict:
    from ..runtime.pipeline import Pipeline, SamplingParams

    keys = {q.question_id: question_key(q, max_new_tokens) for q in questions}
    sampling = SamplingParams(max_new_tokens)  # greedy: the answers are scored, and tied to this setting
    # every answer file read and checked once, before any model loads
    existing = {config.label: read_answers(out / config.answer_file, config.sha256) for config in configs}
    results = {}
    for config in configs:
        path = out / config.answer_file
        done = existing[config.label]
        # an answer counts only for the question it answered: the same id with another text, image or
        # generation setting is answered again (the newer record is the one read back)
        done = {qid: r for qid, r in done.items() if r["metadata"].get("question_key") == keys.get(qid)}
        results[config.label] = {q.question_id: done[q.question_id] for q in questions if q.question_id in done}
        todo = [q for q in questions if q.question_id not in done]
        if progress:
            progress(config.label, len(questions) - len(todo))
        if not todo:
            continue
        pipeline = Pipeline.from_artifacts(config.artifact, provider=provider,
                                           method="none" if config.graph == "baseline" else None)
        # every question's TTFT cold, so that configurations compare alike: a question-reading graph would otherwise
        # run the tower once per image (the pipeline keeps its patch outputs) and look faster than it is for one
        # question (bench/bench_second_question.py measures that reuse on its own)
        pipeline.TOWER_CACHE = 0
        model_id = f"{Path(str(config.build['source'])).name}-{config.label}"
        with open_answers(path) as handle:
            for q in todo:
                try:
                    result = pipeline.generate(str(q.image), q.text, sampling=sampling)
                except InputError as exc:  # the answers so far are kept: a rerun resumes after fixing this one
                    raise InputError(f"question {q.question_id} ({q.image.name}): {exc}") from None
                t = result.timings_ms
                record = {"question_id": q.question_id, "prompt": q.text, "text": result.text.strip(),
                          "answer_id": uuid.uuid4().hex, "model_id": model_id,
                          "metadata": {"configuration": config.label, "method": config.method,
                                       "artifact": str(config.artifact), "artifact_sha256": config.sha256,
                                       "visual_tokens": result.visual_tokens[0], "prompt_tokens": result.prompt_tokens,
                                       "generated_tokens": result.generated_tokens, "stop_reason": result.stop_reason,
                                       "ttft_ms": t["ttft"], "prefill_ms": t["prefill"], "vision_ms": t.get("vision"),
                                       "preprocess_ms": t.get("preprocess"), "max_new_tokens": max_new_tokens,
                                       "question_key": keys[q.question_id]}}
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                results[config.label][q.question_id] = record
                if progress:
                    progress(config.label, 1)
    return results


def summarize(questions: Sequence[EvalQuestion], configs: Sequence[Configuration], answers: dict) -> list:
    """Per configuration: accuracy (overall and by category), POPE's yes/no metrics, agreement with the
    full-token answers, visual tokens (mean/min/max), prefill and TTFT p50/p90."""
    reference = next((c.label for c in configs if c.method == "none"), None)
    rows = []
    for config in configs:
        got = answers.get(config.label, {})
        scored = [(q, got[q.question_id]) for q in questions if q.question_id in got]
        row = {"configuration": config.label, "artifact": str(config.artifact), "method": config.method,
               "build": config.build, "answered": len(scored), "questions": len(questions)}
        graded = [(q, r) for q, r in scored if q.answer is not None]
        if graded:
            row["accuracy"] = float(np.mean([scoring.score(r["text"], q.answer) for q, r in graded]))
            categories = {}
            for q, r in graded:
                categories.setdefault(q.category or "all", []).append(scoring.score(r["text"], q.answer))
            row["by_category"] = {k: float(np.mean(v)) for k, v in sorted(categories.items())}
            row["yes_no"] = scoring.yes_no_metrics([(r["text"], q.answer) for q, r in graded
                                                    if scoring.kind_of(q.answer) == "yesno"])
        if reference is not None and reference != config.label:
            base = answers.get(reference, {})
            both = [(q, r) for q, r in scored if q.question_id in base]
            if both:
                row["agreement"] = float(np.mean([scoring.same_answer(r["text"], base[q.question_id]["text"], q.answer)
                                                  for q, r in both]))
        if scored:
            meta = [r["metadata"] for _, r in scored]
            tokens = [m["visual_tokens"] for m in meta]
            row["visual_tokens"] = {"mean": float(np.mean(tokens)), "min": int(min(tokens)), "max": int(max(tokens))}
            for key in ("ttft_ms", "prefill_ms"):
                values = [m[key] for m in meta]
                row[key] = {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90))}
        rows.append(row)
    full = next((r for r in rows if r["configuration"] == reference and "accuracy" in r), None)
    withheld = ratio_withheld(full, questions) if full is not None else None
    for row in rows:
        if full is not None and "accuracy" in row:
            if withheld:
                row["accuracy_ratio_withheld"] = withheld
            elif full["accuracy"] > 0:
                row["accuracy_ratio"] = row["accuracy"] / full["accuracy"]
    return rows


RATIO_MIN_RIGHT = 20  # right full-token answers below which "x full" is a ratio of a few coin flips
RATIO_MIN_MARGIN = 0.25  # the full-token accuracy must clear chance by this much for "x full" to mean anything


def chance_accuracy(questions: Sequence[EvalQuestion]) -> float:
    """What guessing scores on these questions: 1/2 for a yes/no one, and for the others one over the number of
    distinct reference answers of its category (or of the file, without categories), the best a guesser that knows
    the answer set but not the image can do on average."""
    graded = [q for q in questions if q.answer is not None]
    answers = {}
    for q in graded:
        if scoring.kind_of(q.answer) != "yesno":
            refs = q.answer if isinstance(q.answer, list) else [q.answer]
            answers.setdefault(q.category, set()).update(scoring.normalize(str(r)) for r in refs)
    odds = [0.5 if scoring.kind_of(q.answer) == "yesno" else 1 / max(1, len(answers[q.category])) for q in graded]
    return float(np.mean(odds)) if odds else 0.0


def ratio_withheld(full: dict, questions: Sequence[EvalQuestion]) -> str | None:
    """Why "x full" would mean nothing for this full-token row (None when it means something): a ratio to a
    reference that is right only by chance, or only a handful of times, says nothing about what reduction costs."""
    right = round(full["accuracy"] * sum(q.answer is not None for q in questions))
    chance = chance_accuracy(questions)
    if full["accuracy"] < chance + RATIO_MIN_MARGIN:
        return (f"full tokens are right {full['accuracy']:.3f} of the time, within {RATIO_MIN_MARGIN} of chance "
                f"({chance:.3f}) on these questions")
    if right < RATIO_MIN_RIGHT:
        return f"full tokens are right on {right} questions, fewer than {RATIO_MIN_RIGHT}"
    return None


def evaluate(artifacts: Sequence[str | Path], questions_file: str | Path, images: str | Path | None = None,
             methods: Sequence[str] | None = None, out: str | Path = "evaluation", provider: str = "cpu",
             max_new_tokens: int = 16, limit: int | None = None,
             progress: Callable[[str, int], None] | None = None, reports: Sequence[tuple] = ()) -> dict:
    """The whole evaluation: read and check the question file and the artifacts (before any model runs), answer
    (resuming), summarise. Returns ``{"questions", "configurations": [summary rows], "answer_files"}``.
    ``reports``: (flag, path) of the files the caller will write afterwards (``--json``, ``--plot``), checked here
    with ``out`` before any work: none may be an input (the question file, an image, an artifact) or lie inside an
    artifact."""
    from ..outputs import check_outputs
    from .questions import read_questions

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    questions = read_questions(questions_file, images)[:limit]
    inputs = [Path(questions_file), *(Path(a) for a in artifacts), *{q.image for q in questions}]
    check_outputs(reports, inputs, folders=[("--out", Path(out))],
                  pictures=[flag for flag, _ in reports if flag == "--plot"])
    configs = configurations(artifacts, methods)
    answers = run(questions, configs, Path(out), provider=provider, max_new_tokens=max_new_tokens, progress=progress)
    return {"questions": str(questions_file), "question_count": len(questions),
            "configurations": summarize(questions, configs, answers),
            "answer_files": {c.label: str(Path(out) / c.answer_file) for c in configs}}
