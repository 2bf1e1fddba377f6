"""``evaluate``: the field's scoring rules, LLaVA's file formats, resuming, choosing by budget, end to end on an
artifact (answers are the pipeline's own)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from prumerge import shapes_qa
from prumerge.errors import InputError
from prumerge.evaluate import budget, scoring
from prumerge.evaluate.questions import read_answers, read_questions


# ------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("text, reference, expected", [
    ("Two.", "2", 1.0), ("two", "2", 1.0), ("The circle", "circle", 1.0), ("a red one", "red 1", 1.0),
    ("Red!", "red", 1.0), ("red square", "red", 0.0), ("dont", "don't", 1.0), ("1,000", "1000", 1.0),
    ("blue", ["blue", "blue", "navy"], 2 / 3), ("blue", ["blue", "blue", "blue", "navy"], 1.0),
    ("Yes, there is.", "yes", 1.0), ("There is not a red star.", "no", 1.0), ("No.", "yes", 0.0),
    ("B. The red one", "B", 1.0), ("(C)", "C", 1.0), ("The answer is D", "D", 1.0), ("A", "B", 0.0),
])
def test_scores_as_vqa_pope_and_multiple_choice_scorers_do(text, reference, expected):
    assert scoring.score(text, reference) == pytest.approx(expected)


def test_yes_no_metrics_are_popes():
    pairs = [("yes", "yes"), ("Yes it is", "yes"), ("Yes.", "yes"), ("yes", "no"), ("no", "no"), ("No.", "no"),
             ("No, not at all", "yes"), ("No", "yes")]
    m = scoring.yes_no_metrics(pairs)  # tp=3 fp=1 tn=2 fn=2: every figure differs, so no two can be swapped
    assert m["accuracy"] == pytest.approx(5 / 8) and m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5) and m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(4 / 8)
    assert scoring.yes_no_metrics([]) is None


# ------------------------------------------------------------------------------------------------ files
def _qfile(tmp_path, lines, image=True):
    (tmp_path / "img").mkdir(exist_ok=True)
    if image:
        shapes_qa.make_scene(__import__("numpy").random.default_rng(0)).image.save(tmp_path / "img" / "a.png")
    path = tmp_path / "q.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("line, message", [
    ({"image": "a.png", "text": "q"}, "question_id"),
    ({"question_id": 1, "image": "a.png", "text": ""}, "text"),
    ({"question_id": 1, "image": "../a.png", "text": "q"}, "outside the image folder"),
    ({"question_id": 1, "image": "b.png", "text": "q"}, "not found"),
    ({"question_id": 1, "image": "a.png", "text": "q", "answer": 3}, "answer must be"),
    ("{not json", "not a JSON object"),
])
def test_bad_question_files_are_one_error_naming_the_line(tmp_path, line, message):
    path = _qfile(tmp_path, [{"question_id": 0, "image": "a.png", "text": "ok"}, line])
    with pytest.raises(InputError, match=message) as info:
        read_questions(path, tmp_path / "img")
    assert ":2" in str(info.value)


def test_duplicate_ids_and_empty_files_are_refused(tmp_path):
    path = _qfile(tmp_path, [{"question_id": 0, "image": "a.png", "text": "x"}] * 2)
    with pytest.raises(InputError, match="appears twice"):
        read_questions(path, tmp_path / "img")
    with pytest.raises(InputError, match="no questions"):
        read_questions(_qfile(tmp_path, []), tmp_path / "img")


def test_an_interrupted_answer_file_resumes_from_its_whole_lines(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = {"question_id": "1", "text": "red", "metadata": {"artifact_sha256": "abc"}}
    path.write_text(json.dumps(good) + "\n" + '{"question_id": "2", "te')
    assert list(read_answers(path, "abc")) == ["1"]
    assert path.read_text() == json.dumps(good) + "\n"  # the cut line is gone, nothing else
    with pytest.raises(InputError, match="another artifact"):
        read_answers(path, "other")


# ------------------------------------------------------------------------------------------------ budget
def _row(name, method, accuracy, ttft, ratio=None, capacity=40):
    row = {"configuration": name, "method": method, "accuracy": accuracy, "ttft_ms": {"p50": ttft, "p90": ttft},
           "visual_tokens": {"mean": 1.0}, "build": {"source": "ckpt", "method": method, "capacity": capacity,
                                                     "precision": "fp32", "llm_precision": "int4", "image_size": 224,
                                                     "output": "padded", "reducer_options": {"neighbors": 16}}}
    if ratio is not None:
        row["accuracy_ratio"] = ratio
    return row


ROWS = [_row("none", "none", 0.95, 300, 1.0), _row("prumerge", "prumerge", 0.80, 100, 0.80 / 0.95),
        _row("prumerge+", "prumerge+", 0.93, 180, 0.93 / 0.95)]


def test_choose_by_budget():
    assert budget.choose(ROWS, ttft_budget_ms=200)["configuration"] == "prumerge+"  # most accurate within budget
    assert budget.choose(ROWS, ttft_budget_ms=1000)["configuration"] == "none"
    assert budget.choose(ROWS, min_accuracy_ratio=0.8)["configuration"] == "prumerge"  # fastest that keeps 80 %
    assert budget.choose(ROWS, min_accuracy_ratio=0.95)["configuration"] == "prumerge+"
    assert budget.choose(ROWS, ttft_budget_ms=250, min_accuracy_ratio=0.97)["configuration"] == "prumerge+"
    with pytest.raises(InputError, match="median TTFT <= 250 ms and accuracy >= 0.99"):
        budget.choose(ROWS, ttft_budget_ms=250, min_accuracy_ratio=0.99)
    with pytest.raises(InputError, match="no measured configuration"):
        budget.choose(ROWS, ttft_budget_ms=50)
    with pytest.raises(InputError, match="needs the full-token configuration"):
        budget.choose([_row("p", "prumerge", 0.5, 10)], min_accuracy_ratio=0.9)
    with pytest.raises(InputError):
        budget.choose(ROWS)


def _summary(full_right: int, reduced_right: int, per_category: int = 20):
    """summarize() over colour and count questions (four answers each: chance 1/4) where the full-token
    configuration is right ``full_right`` times and PruMerge ``reduced_right`` times."""
    from pathlib import Path
    from types import SimpleNamespace

    from prumerge.evaluate.questions import EvalQuestion
    from prumerge.evaluate.runner import summarize

    questions = [EvalQuestion(f"{c}{i}", Path("a.png"), "q", answers[i % 4], c)
                 for c, answers in (("color", ("red", "blue", "green", "yellow")), ("count", ("1", "2", "3", "4")))
                 for i in range(per_category)]
    configs = [SimpleNamespace(label=m, method=m, artifact="a", build={}) for m in ("none", "prumerge")]
    meta = {"visual_tokens": 10, "ttft_ms": 100.0, "prefill_ms": 50.0}
    answers = {m: {q.question_id: {"text": q.answer if i < right else "purple", "metadata": meta}
                   for i, q in enumerate(questions)} for m, right in (("none", full_right), ("prumerge", reduced_right))}
    return {r["configuration"]: r for r in summarize(questions, configs, answers)}


def test_x_full_is_withheld_where_the_full_token_answers_are_near_chance_or_few():
    rows = _summary(full_right=3, reduced_right=12)  # the user: 3 of 40 with all tokens
    assert "accuracy_ratio" not in rows["prumerge"] and "chance (0.250)" in rows["prumerge"]["accuracy_ratio_withheld"]
    with pytest.raises(InputError, match="--min-accuracy-ratio cannot choose on these questions: full tokens are right 0.075"):
        budget.choose(list(rows.values()), min_accuracy_ratio=0.9)
    assert budget.choose(list(rows.values()), ttft_budget_ms=1000)  # a latency budget still chooses
    few = _summary(full_right=7, reduced_right=6, per_category=4)  # 7 of 8 right: far above chance, but 7 answers
    assert "fewer than 20" in few["prumerge"]["accuracy_ratio_withheld"]
    rows = _summary(full_right=32, reduced_right=28)
    assert rows["prumerge"]["accuracy_ratio"] == pytest.approx(28 / 32) and "accuracy_ratio_withheld" not in rows["prumerge"]
    # the margin is over chance: 0.475 right is within 0.25 of 0.25, 0.525 is not
    assert "accuracy_ratio_withheld" in _summary(19, 10)["prumerge"] and "accuracy_ratio" in _summary(21, 10)["prumerge"]


def test_the_table_says_why_x_full_is_withheld():
    from rich.console import Console

    from prumerge.evaluate.report import table

    console = Console(width=200, record=True)
    console.print(table(list(_summary(full_right=3, reduced_right=12).values())))
    text = console.export_text()
    assert "n/a*" in text and "* x full withheld: full tokens are right 0.075" in text


def test_build_command_rebuilds_the_chosen_configuration():
    command = budget.build_command(ROWS[2], out="x")
    assert command.startswith("prumerge-export build ckpt --out x --method prumerge+ --max-tokens 40")
    assert "--neighbors 16" in command and "--llm-precision int4" in command and "--image-size 224" in command
    assert "--max-tokens" not in budget.build_command(ROWS[0])


def test_an_int8_build_command_rebuilds_the_form_that_was_measured(tmp_path, monkeypatch):
    """The chosen INT8 configuration's build line carries its calibration method and float layers, and the real
    CLI turns it back into the same INT8 stage (not the default form)."""
    import shlex

    from click.testing import CliRunner

    import prumerge.export.build as build
    from prumerge.cli import main
    from prumerge.export.options import Int8Options

    row = _row("prumerge@int8", "prumerge", 0.8, 100, 0.9)
    row["build"].update(precision="int8", int8_calibration_method="per-token", int8_float_layers=2)
    command = budget.build_command(row, out=str(tmp_path / "o"))
    assert "--calibration-method per-token" in command and "--int8-float-layers 2" in command
    seen = {}
    monkeypatch.setattr(build, "build_artifact", lambda model, out, options, **kw: seen.setdefault("int8", options.int8))
    (tmp_path / "CALIBRATION.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    CliRunner().invoke(main, shlex.split(command)[1:])  # build_artifact is replaced: nothing is built
    assert seen["int8"] == Int8Options(method="per-token", float_layers=2)
    row["build"]["int8_calibration_method"] = "minmax"
    assert "--calibration-method" not in budget.build_command(row)  # the default needs no flag
    row["build"].update(int8_float_layers=0, int8_target_jaccard=0.9)  # layers chosen by a target: the target again
    seen.clear()
    CliRunner().invoke(main, shlex.split(budget.build_command(row, out=str(tmp_path / "p")))[1:])
    assert seen["int8"] == Int8Options(method="minmax", target_jaccard=0.9)
    plain = _row("p", "prumerge", 0.8, 100)
    plain["build"].update(opset=18, attention="plain")
    assert "--opset" not in budget.build_command(plain)  # the default needs no flag
    plain["build"].update(opset=23, attention="fused")  # fused attention was measured: built again
    assert "--opset 23" in budget.build_command(plain)


def test_build_command_of_a_fixed_count_method_gives_its_counts_not_a_capacity(tmp_path, monkeypatch):
    """VisionZip's count is its options' (a capacity flag would be refused by build): the chosen artifact's command
    carries --dominant-tokens / --contextual-tokens and no --max-tokens, and the CLI makes that reducer from it."""
    import shlex

    from click.testing import CliRunner

    import prumerge.export.build as build
    from prumerge.cli import main

    row = _row("visionzip", "visionzip", 0.8, 100, 0.9, capacity=34)
    row["build"]["reducer_options"] = {"dominant_tokens": 29, "contextual_tokens": 5, "diverse_tokens": 64}
    command = budget.build_command(row, out=str(tmp_path / "o"))
    assert "--max-tokens" not in command and "--dominant-tokens 29 --contextual-tokens 5" in command
    seen = {}
    monkeypatch.setattr(build, "build_artifact", lambda model, out, options, **kw: seen.setdefault("reducer", options.reducer))
    CliRunner().invoke(main, shlex.split(command)[1:])  # build_artifact is replaced: nothing is built
    assert seen["reducer"].fixed_count == 34 and seen["reducer"].capacity is None


@pytest.mark.parametrize("seed", range(40))
def test_build_command_parsed_by_build_gives_the_configuration_back(seed, tmp_path, monkeypatch):
    """``build_command`` is the inverse of the command line's parse (both generated from the options' declarations):
    a random configuration, recorded as a manifest records it, becomes a command that ``build`` reads back into the
    same reducer, graph, LLM and INT8 options."""
    import random
    import shlex

    from click.testing import CliRunner

    import prumerge.export.build as build
    from prumerge.cli import main
    from prumerge.reduce import registry
    from prumerge.reduce.config import ReducerConfig

    rng = random.Random(seed)
    method = rng.choice(registry.names())
    options = {}
    for name, spec in registry.options().items():
        if rng.random() < 0.5:
            continue
        if spec.choices:
            options[name] = rng.choice(spec.choices)
        elif spec.kind is int:
            options[name] = rng.randint(int(spec.minimum or 0), 60)
        else:
            options[name] = rng.choice([0.0, 0.3, 1.5, 2.25, 1 / 3, 7.123456789])
    adaptive = registry.get(method).adaptive
    reducer = ReducerConfig(method=method, capacity=rng.randint(2, 50) if adaptive else None, **options)
    reads_question = bool(registry.get(method).inputs)  # such graphs refuse INT8 and the int8 KV cache (for now)
    int8 = rng.random() < 0.4 and method != "none" and not reads_question
    facts = {"source": "ckpt", "revision": rng.choice([None, "v1"]), "method": method, "capacity": reducer.capacity,
             "precision": "int8" if int8 else rng.choice(["fp32", "fp16"]), "opset": rng.choice([18, 23]),
             "output": rng.choice(["padded", "dynamic"]), "image_size": rng.choice([None, 224, 336]),
             "llm_precision": rng.choice(["int4", "int8", "fp32"]), "llm_kv_cache": rng.choice(["float", "int8", "mixed"]),
             "int8_calibration_method": rng.choice(["minmax", "entropy", "percentile"]) if int8 else None,
             "int8_float_layers": rng.choice([0, 2]) if int8 else None,
             "reducer_options": {k: v for k, v in reducer.to_dict().items() if k not in ("method", "capacity")}}
    if reads_question and rng.random() < 0.5:  # CLIP's text side (its sign's default is the released negated)
        facts["text_encoder"] = "clip-dir"
    if facts["llm_kv_cache"] != "float" and facts["llm_precision"] == "fp16":
        facts["llm_kv_cache"] = "float"
    seen = {}

    def parsed_only(model, out, options, **kw):  # nothing is built: what build was asked for is recorded
        seen["options"] = options
        raise SystemExit(0)

    monkeypatch.setattr(build, "build_artifact", parsed_only)
    result = CliRunner().invoke(main, shlex.split(budget.build_command({"build": facts}, out=str(tmp_path / "o")))[1:])
    assert result.exit_code == 0, result.output
    parsed = seen["options"]
    # method none runs no reducer: its build takes no reducer options (the defaults are recorded)
    assert parsed.reducer == (reducer if method != "none" else ReducerConfig(method="none"))
    assert (parsed.graph.opset, parsed.graph.contract, parsed.graph.image_size, parsed.graph.precision) == \
        (facts["opset"], facts["output"], facts["image_size"], "fp16" if facts["precision"] == "fp16" else "fp32")
    assert (parsed.llm.precision, parsed.llm.kv_cache, parsed.source.revision, parsed.source.text_encoder) == \
        (facts["llm_precision"], facts["llm_kv_cache"], facts["revision"], facts.get("text_encoder"))
    assert (parsed.int8 is not None) == int8
    if int8:
        assert (parsed.int8.method, parsed.int8.float_layers) == (facts["int8_calibration_method"], facts["int8_float_layers"])


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def llm_artifact(artifact_factory):
    return artifact_factory("llava", "prumerge", "padded", llm_precision="fp32", baseline=True)


@pytest.mark.slow
def test_evaluate_end_to_end_writes_llava_answers_resumes_and_chooses(llm_artifact, tmp_path):
    from prumerge.cli import main
    from prumerge.runtime.pipeline import Pipeline

    qfile = shapes_qa.write_question_file(tmp_path / "set", images=2, seed=5, per_image=2)
    pope = tmp_path / "set" / "pope.jsonl"  # a hand-made POPE-style file
    pope.write_text("".join(json.dumps({"question_id": i, "image": "images/00000.png", "text": f"Is there a {c} circle?",
                                        "answer": a, "category": "adversarial"}) + "\n"
                            for i, (c, a) in enumerate([("red", "yes"), ("blue", "no")])))
    out = tmp_path / "answers"
    args = ["evaluate", str(llm_artifact), "--questions", str(qfile), "--out", str(out), "--max-new-tokens", "3",
            "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"), "--ttft-budget-ms", "1e9"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {r["configuration"]: r for r in report["configurations"]}
    assert set(rows) == {"none", "prumerge"}
    assert rows["none"]["visual_tokens"]["mean"] == 64 and rows["prumerge"]["visual_tokens"]["max"] < 64
    assert 0 <= rows["prumerge"]["agreement"] <= 1
    assert "accuracy_ratio" not in rows["prumerge"]  # four questions: "x full" of a handful of answers means nothing
    assert "fewer than 20" in rows["prumerge"]["accuracy_ratio_withheld"] or "chance" in rows["prumerge"]["accuracy_ratio_withheld"]
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "build it: prumerge-export build" in result.output

    questions = read_questions(qfile)
    answers = [json.loads(line) for line in (out / "answers-prumerge.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [q.question_id for q in questions]
    assert all({"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(a) for a in answers)
    pipeline = Pipeline.from_artifacts(llm_artifact)  # the answers are the pipeline's own
    direct = pipeline.generate(str(questions[1].image), questions[1].text, max_new_tokens=3)
    assert answers[1]["text"] == direct.text.strip()
    assert answers[1]["metadata"]["visual_tokens"] == direct.visual_tokens[0]
    expected = sum(scoring.score(a["text"], q.answer) for a, q in zip(answers, questions)) / len(questions)
    assert rows["prumerge"]["accuracy"] == pytest.approx(expected)

    # resume: a cut-off last answer is redone, the others are kept as they were
    path = out / "answers-prumerge.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    again = CliRunner().invoke(main, args[:-2])
    assert again.exit_code == 0, again.output
    redone = [json.loads(line) for line in path.read_text().splitlines()]
    assert [a["answer_id"] for a in redone[:-1]] == [a["answer_id"] for a in answers[:-1]]
    assert redone[-1]["answer_id"] != answers[-1]["answer_id"] and redone[-1]["text"] == answers[-1]["text"]

    popes = CliRunner().invoke(main, ["evaluate", str(llm_artifact), "--questions", str(pope), "--methods", "prumerge",
                                      "--out", str(tmp_path / "pope"), "--max-new-tokens", "2", "--json", str(tmp_path / "p.json")])
    assert popes.exit_code == 0, popes.output
    (row,) = json.loads((tmp_path / "p.json").read_text())["configurations"]
    assert row["yes_no"]["questions"] == 2 and set(row["by_category"]) == {"adversarial"}


def test_evaluate_errors_are_one_line_before_any_work(llm_artifact, tmp_path):
    from prumerge.cli import main

    qfile = shapes_qa.write_question_file(tmp_path / "set", images=1, seed=1)
    cases = [
        (["--methods", "prumerge+"], "no artifact provides prumerge+"),
        (["--methods", "bogus"], "unknown method"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--limit", "0"], "--limit must be"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(main, ["evaluate", str(llm_artifact), "--questions", str(qfile),
                                           "--out", str(tmp_path / "o"), *extra])
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        assert "Traceback" not in result.output
    assert not any((tmp_path / "o").glob("*.jsonl"))  # nothing was answered


def test_the_same_graphs_given_twice_are_evaluated_once(llm_artifact, tmp_path):
    import shutil

    from prumerge.evaluate.runner import configurations

    copy = tmp_path / "copy"
    shutil.copytree(llm_artifact, copy)
    configs = configurations([llm_artifact, copy])
    assert [(c.label, c.artifact) for c in configs] == [("prumerge", llm_artifact), ("none", llm_artifact)]
    assert [c.label for c in configurations([llm_artifact], ["none"])] == ["none"]
