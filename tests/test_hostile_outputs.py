"""Hostile input, round three: outputs never land on inputs or in artifacts, and evaluate's answer files are tied to
what produced them (checked before touched, never through a link, one writer at a time, injective names).

Each case reproduces what round three found (exit 0 with data lost, or a traceback) and asserts the guarantee."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from prumerge import shapes_qa
from prumerge.errors import InputError
from prumerge.evaluate.questions import EvalQuestion, answers_lock, question_key, read_answers, read_questions
from prumerge.evaluate.runner import Configuration
from prumerge.outputs import check_outputs


@pytest.fixture(scope="module")
def llm_artifact(artifact_factory):
    return artifact_factory("llava", "prumerge", "padded", llm_precision="fp32", baseline=True)


def _evaluate(*args):
    from prumerge.cli import main

    return CliRunner().invoke(main, ["evaluate", *map(str, args)])


# ------------------------------------------------------------------------------------------------ outputs onto inputs
def test_evaluate_refuses_every_output_onto_an_input_or_into_an_artifact(llm_artifact, tmp_path):
    qfile = shapes_qa.write_question_file(tmp_path / "set", images=1, seed=1)
    before = qfile.read_bytes()
    image = tmp_path / "set" / "images" / "00000.png"
    image_bytes = image.read_bytes()
    manifest = (llm_artifact / "manifest.json").read_bytes()
    base = [llm_artifact, "--questions", qfile, "--max-new-tokens", 2]
    cases = [
        (["--out", tmp_path / "o", "--json", qfile], "is one of this command's inputs"),
        (["--out", tmp_path / "o", "--json", llm_artifact / "manifest.json"], "lies inside the artifact"),
        (["--out", tmp_path / "o", "--plot", image], "is one of this command's inputs"),
        (["--out", tmp_path / "o", "--json", tmp_path / "set" / ".." / "set" / "questions.jsonl"], "inputs"),
        (["--out", llm_artifact / "answers"], "lies inside the artifact"),
        (["--out", tmp_path / "o", "--json", llm_artifact / "report.json"], "lies inside the artifact"),
        (["--out", tmp_path / "o", "--plot", tmp_path / "plot.xyz"], "a picture is written as"),
        (["--out", qfile / "child"], "is a file, so no folder can be made under it"),
    ]
    for extra, message in cases:
        result = _evaluate(*base, *extra)
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        assert "Traceback" not in result.output
    assert qfile.read_bytes() == before and image.read_bytes() == image_bytes
    assert (llm_artifact / "manifest.json").read_bytes() == manifest and not (llm_artifact / "answers").exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.jsonl"))  # refused before any answer


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_refused_before_the_run(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable"):
            check_outputs([("--json", locked / "r.json")])
        with pytest.raises(InputError, match="not writable"):
            check_outputs([], folders=[("--out", locked / "answers")])
    finally:
        locked.chmod(0o700)


def test_budgets_that_cannot_choose_are_refused_before_any_answer(llm_artifact, tmp_path):
    qfile = shapes_qa.write_question_file(tmp_path / "set", images=1, seed=1)
    for extra, message in [(["--ttft-budget-ms", "-1"], "--ttft-budget-ms must be"),
                           (["--ttft-budget-ms", "nan"], "--ttft-budget-ms must be"),
                           (["--min-accuracy-ratio", "nan"], "--min-accuracy-ratio must be"),
                           (["--methods", "prumerge", "--min-accuracy-ratio", "0.9"], "needs the full-token configuration")]:
        result = _evaluate(llm_artifact, "--questions", qfile, "--out", tmp_path / "o", *extra)
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.jsonl"))


def test_profile_and_calibrate_and_inspect_refuse_outputs_onto_their_inputs(llm_artifact, tmp_path):
    from prumerge.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    shapes_qa.make_scene(__import__("numpy").random.default_rng(0)).image.save(folder / "a.png")
    photo = folder / "a.png"
    before = photo.read_bytes()
    listing = tmp_path / "list.txt"
    listing.write_text("x")
    cases = [
        ["profile", llm_artifact, "--images", photo, "--json", photo, "--runs", 1],
        ["profile", llm_artifact, "--images", photo, "--plot", photo, "--runs", 1],
        ["profile", llm_artifact, "--images", photo, "--json", llm_artifact / "manifest.json", "--runs", 1],
        ["calibrate", folder, "--model", llm_artifact, "--out", photo],
        ["calibrate", folder, "--model", llm_artifact, "--histogram", photo],
        ["inspect", photo, "--model", llm_artifact, "--out", photo],
    ]
    for args in cases:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code != 0, (args, result.output)
        assert "inputs" in result.output or "inside the artifact" in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert photo.read_bytes() == before


# ------------------------------------------------------------------------------------------------ answer files
def _config(label: str, sha: str = "s" * 64) -> Configuration:
    return Configuration(label, Path("a"), label.partition("@")[0], "vision", sha, {"source": "m"})


def test_answer_file_names_are_injective():
    labels = ["prumerge@x y", "prumerge@x_y", "prumerge@x_20_y", "prumerge+@a", "prumerge@a", "prumerge@aplus",
              "prumerge+", "prumerge", "none", "prumerge@a-at-b", "prumerge@a@b", "prumerge@é", "prumerge@e"]
    names = [_config(label).answer_file for label in labels]
    assert len(set(names)) == len(names), names
    assert all(n.startswith("answers-") and n.endswith(".jsonl") and "/" not in n for n in names)
    assert _config("prumerge+").answer_file == "answers-prumergeplus.jsonl"


def _record(qid, sha="s" * 64, **meta):
    return json.dumps({"question_id": qid, "prompt": "q", "text": "red", "answer_id": "x", "model_id": "m",
                       "metadata": {"artifact_sha256": sha, **meta}})


def test_a_file_evaluate_did_not_write_is_refused_and_left_as_it_was(tmp_path):
    notes = tmp_path / "answers-prumerge.jsonl"
    for text in ("my notes", "my notes\nmore", _record("1") + "\n" + "my notes"):
        notes.write_text(text)
        with pytest.raises(InputError, match="not an answer record written by evaluate"):
            read_answers(notes, "s" * 64)
        assert notes.read_text() == text  # nothing truncated before the check


def test_damaged_lines_are_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "answers-prumerge.jsonl"
    for bad, problem in [('{"question_id": "2", "text": "x", "metadata": "oops"}', "metadata"),
                         ('{"question_id": "2", "metadata": {}}', "text"),
                         ('{"question_id": "2", "text": 5, "metadata": {}}', "text"),
                         ("[" * 200000 + "]" * 200000, "not JSON"),
                         ('{"question_id": true, "text": "x", "metadata": {}}', "question_id")]:
        path.write_text(_record("1") + "\n" + bad + "\n" + _record("3") + "\n")
        with pytest.raises(InputError, match=f"answers-prumerge.jsonl:2 .*{problem}"):
            read_answers(path, "s" * 64)


def test_answer_files_are_never_written_through_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    out = tmp_path / "answers"
    out.mkdir()
    (out / "answers-prumerge.jsonl").symlink_to(outside)
    with pytest.raises(InputError, match="is a link"):
        read_answers(out / "answers-prumerge.jsonl", "s" * 64)
    assert outside.read_text() == "precious\n"
    (out / "answers-prumerge.jsonl").unlink()
    (out / "answers-prumerge.jsonl").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        read_answers(out / "answers-prumerge.jsonl", "s" * 64)


def test_one_evaluate_at_a_time_per_answer_folder(tmp_path):
    held, release = threading.Event(), threading.Event()

    def hold():
        with answers_lock(tmp_path):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10)
        import subprocess
        import sys

        code = ("import sys; from pathlib import Path; from prumerge.evaluate.questions import answers_lock\n"
                "from prumerge.errors import InputError\n"
                "try:\n    with answers_lock(Path(sys.argv[1])): print('held')\n"
                "except InputError as e: print(e)")
        got = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert "another evaluate is writing answers" in got.stdout, got
    finally:
        release.set()
        thread.join()
    with answers_lock(tmp_path):  # free again once the first run ends
        pass


def test_an_answer_is_tied_to_its_question_text_image_and_settings(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    q = EvalQuestion("1", tmp_path / "a.png", "What color?", "red")
    key = question_key(q, 16)
    assert key == question_key(EvalQuestion("1", tmp_path / "a.png", "What color?", "blue"), 16)  # reference only
    assert key != question_key(EvalQuestion("1", tmp_path / "a.png", "What shape?", "red"), 16)
    assert key != question_key(EvalQuestion("1", tmp_path / "b.png", "What color?", "red"), 16)
    assert key != question_key(q, 4)
    Image.new("RGB", (8, 8), "green").save(tmp_path / "a.png")  # the same file name, another picture
    os.utime(tmp_path / "a.png", ns=(1, 1))
    assert key != question_key(q, 16)


@pytest.mark.slow
def test_evaluate_answers_again_when_the_question_behind_an_id_changed(llm_artifact, tmp_path):
    qfile = shapes_qa.write_question_file(tmp_path / "set", images=1, seed=2, per_image=2)
    out = tmp_path / "o"
    assert _evaluate(llm_artifact, "--questions", qfile, "--out", out, "--methods", "prumerge",
                     "--max-new-tokens", 2).exit_code == 0
    first = (out / "answers-prumerge.jsonl").read_text().splitlines()
    lines = [json.loads(line) for line in qfile.read_text().splitlines()]
    lines[0]["text"] = "Is there a purple star?"  # same id, another question
    qfile.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = _evaluate(llm_artifact, "--questions", qfile, "--out", out, "--methods", "prumerge",
                       "--max-new-tokens", 2, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "answers-prumerge.jsonl").read_text().splitlines()]
    assert len(records) == len(first) + 1 and records[-1]["prompt"] == "Is there a purple star?"
    assert records[-1]["question_id"] == lines[0]["question_id"]
    again = _evaluate(llm_artifact, "--questions", qfile, "--out", out, "--methods", "prumerge", "--max-new-tokens", 3)
    assert again.exit_code == 0
    assert len((out / "answers-prumerge.jsonl").read_text().splitlines()) == len(records) + len(lines)  # new setting
    assert len(read_questions(qfile)) == len(lines)


def test_question_files_that_crashed_are_one_line(tmp_path):
    (tmp_path / "img").mkdir()
    for line, message in [("[" * 200000 + "]" * 200000, "nested too deeply"),
                          (json.dumps({"question_id": 1, "image": "a\u0000.png", "text": "q"}), "image must be a file name"),
                          (json.dumps({"question_id": 1, "image": "x" * 5000 + ".png", "text": "q"}), "cannot be opened")]:
        path = tmp_path / "q.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(InputError, match=message):
            read_questions(path, tmp_path / "img")


# ------------------------------------------------------------------------------------------------ options
def test_options_a_build_would_ignore_or_cannot_honour_are_refused_in_one_line(tmp_path):
    """Round three: --no-llm with INT8 or LLM flags built and exited 0 ignoring them; NaN passed as a Jaccard;
    --opset 23 with a TensorRT target wrote build_engine.sh its own op report says cannot run."""
    from prumerge.cli import main

    model = tmp_path / "no-model-needed"  # every case is refused before the checkpoint is opened
    cases = [
        (["build", model, "--out", tmp_path / "a", "--no-llm", "--int8-target-jaccard", "0.5"], "apply to an INT8 vision graph only"),
        (["build", model, "--out", tmp_path / "a", "--int8-float-layers", "2"], "apply to an INT8 vision graph only"),
        (["build", model, "--out", tmp_path / "a", "--calibration-method", "per-token"], "apply to an INT8 vision graph only"),
        (["build", model, "--out", tmp_path / "a", "--no-llm", "--llm-kv-cache", "int8"], "--no-llm builds none"),
        (["build", model, "--out", tmp_path / "a", "--no-llm", "--llm-precision", "fp16"], "--no-llm builds none"),
        (["build", model, "--out", tmp_path / "a", "--int8-target-jaccard", "nan"], "is not a number in (0, 1]"),
        (["calibrate", "--synthetic", "2", "--model", model, "--report", "--int8-target-jaccard", "nan"], "is not a number"),
        (["build", model, "--out", tmp_path / "a", "--opset", "23", "--target", "jetson-orin-nano"], "needs the default --opset 18"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output and not (tmp_path / "a").exists()


def test_the_chosen_build_line_keeps_the_kv_cache_it_measured():
    """Every cache is stated: the default (auto) resolves by provider where the line is run, so a measured float or
    int8 cache must not silently become the mixed one."""
    from prumerge.evaluate import budget

    row = {"build": {"source": "ckpt", "method": "prumerge", "capacity": 40, "precision": "fp32", "llm_precision": "int4",
                     "llm_kv_cache": "int8", "image_size": 224, "output": "padded", "reducer_options": {}}}
    for cache in ("int8", "float", "mixed"):
        row["build"]["llm_kv_cache"] = cache
        assert f"--llm-kv-cache {cache}" in budget.build_command(row)


def test_the_triton_hint_quotes_the_repository_path_and_small_files_are_copies(llm_artifact, tmp_path):
    from prumerge.cli import main

    import shlex

    out = tmp_path / "repo $(touch pwned)"
    result = CliRunner().invoke(main, ["triton", str(llm_artifact), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (hint,) = [line for line in result.output.splitlines() if line.startswith("serve it: ")]
    words = shlex.split(hint.removeprefix("serve it: ").split("  (CPU")[0])  # what a shell pasting it would run
    assert words[:2] == ["tritonserver", "--model-repository"] and words[2].startswith(str(out)) and len(words) == 3
    copied = out / "artifact" / "manifest.json"
    assert copied.stat().st_ino != (llm_artifact / "manifest.json").stat().st_ino  # a copy, not a link to the source


# ------------------------------------------------------------------------------------------------ demo
def test_a_second_demo_reuses_only_an_artifact_it_built_from_the_same_weights_and_options(llm_artifact, tmp_path):
    import shutil

    from prumerge.demo import read_stamp, reusable_artifact, weights_digest, write_stamp
    from prumerge.artifact.manifest import Manifest

    out, checkpoint = tmp_path / "demo", tmp_path / "demo-checkpoint"
    shutil.copytree(llm_artifact, out)
    checkpoint.mkdir()
    sha = Manifest.read(out).sha256
    assert reusable_artifact(out, checkpoint, "opts") is None  # no stamp: built by someone else
    write_stamp(checkpoint, weights=weights_digest(), options="opts", manifest_sha256=sha)
    assert read_stamp(checkpoint)["manifest_sha256"] == sha
    assert reusable_artifact(out, checkpoint, "opts").sha256 == sha
    assert reusable_artifact(out, checkpoint, "other options") is None
    write_stamp(checkpoint, weights="0" * 64)  # a release with other weights
    assert reusable_artifact(out, checkpoint, "opts") is None
    write_stamp(checkpoint, weights=weights_digest())
    graph = next(p for p in out.rglob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")  # altered since
    assert reusable_artifact(out, checkpoint, "opts") is None
