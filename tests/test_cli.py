"""The CLI is a thin layer: commands work, errors are one line with the library's exit code."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from prumerge.cli import main

pytestmark = pytest.mark.slow


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("build", "verify", "inspect", "demo", "run", "profile"):
        assert command in result.output


def test_build_inspect_verify(tmp_path, llava_dir):
    runner = CliRunner()
    out = tmp_path / "art"
    result = runner.invoke(main, ["build", str(llava_dir), "--out", str(out), "--method", "prumerge+", "--output", "dynamic",
                                  "--batch-max", "4", "--baseline"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    info = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).output)
    assert info["vision"]["method"] == "prumerge+" and info["vision"]["contract"] == "dynamic"
    assert info["vision"]["batch_max"] == 4
    verify = runner.invoke(main, ["verify", str(out), "--images", "2"])
    assert verify.exit_code == 0, verify.output
    assert json.loads(verify.output[: verify.output.rindex("}") + 1])["reference"]["ok"]

    again = runner.invoke(main, ["build", str(llava_dir), "--out", str(out)])
    assert again.exit_code == 7 and "already exists" in again.output

    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (160, 120), (200, 30, 30)).save(image)
    answer = runner.invoke(main, ["run", str(out), "--image", str(image), "--prompt", "<image> describe", "--max-new-tokens", "3", "--json"])
    assert answer.exit_code == 0, answer.output
    data = json.loads(answer.output)
    assert data["method"] == "prumerge+" and len(data["visual_tokens"]) == 1 and "ttft" in data["timings_ms"]
    baseline = json.loads(runner.invoke(main, ["run", str(out), "--image", str(image), "--prompt", "<image> describe",
                                               "--max-new-tokens", "2", "--json", "--method-override", "none"]).output)
    assert baseline["visual_tokens"] == [64] and baseline["method"] == "none"
    missing = runner.invoke(main, ["run", str(out), "--prompt", "<image> describe"])
    assert missing.exit_code == 3 and "no image was given" in missing.output


def test_bad_model_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["build", str(tmp_path / "no" / "such" / "model"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 4
    assert "neither a checkpoint directory nor a hub id" in result.output
    assert "Traceback" not in result.output


def test_demo_needs_its_llm_and_says_what_it_is(tmp_path):
    """The demo answers questions: without its LLM it refuses in one line, before building anything (its full run,
    answers included, is the main job that .ci/run executes and checks after the suite)."""
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--no-llm"])
    assert result.exit_code == 2 and "needs its LLM" in result.output and "Traceback" not in result.output
    assert "trained here on generated shapes" in result.output
    assert not (tmp_path / "demo").exists()