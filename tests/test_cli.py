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
    for command in ("build", "verify", "inspect", "demo"):
        assert command in result.output


def test_build_inspect_verify(tmp_path, llava_dir):
    runner = CliRunner()
    out = tmp_path / "art"
    result = runner.invoke(main, ["build", str(llava_dir), "--out", str(out), "--method", "prumerge+", "--output", "dynamic",
                                  "--batch-max", "4"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    info = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).output)
    assert info["reducer"]["method"] == "prumerge+" and info["vision"]["contract"] == "dynamic"
    assert info["vision"]["batch_max"] == 4
    verify = runner.invoke(main, ["verify", str(out), "--images", "2"])
    assert verify.exit_code == 0, verify.output
    assert json.loads(verify.output[: verify.output.rindex("}") + 1])["reference"]["ok"]

    again = runner.invoke(main, ["build", str(llava_dir), "--out", str(out)])
    assert again.exit_code == 7 and "already exists" in again.output


def test_bad_model_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["build", str(tmp_path / "no" / "such" / "model"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 4
    assert "neither a checkpoint directory nor a hub id" in result.output
    assert "Traceback" not in result.output


def test_demo_runs_offline(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output
    assert result.output.count("visual tokens for the LLM") == 4
