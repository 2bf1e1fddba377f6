"""Profiling: every stage for every method, consistent totals, warm-up excluded, PNG/JSON; inspect pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from prumerge.cli import main
from prumerge.errors import ConfigError, InputError
from prumerge.latency import run
from prumerge.artifact.node_stages import classify_nodes
from prumerge.latency.report import plot, write_json
from prumerge.latency.runner import STAGE_ORDER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifacts(artifact_factory):
    return [artifact_factory("llava", "prumerge", "padded", llm_precision="int4", baseline=True),
            artifact_factory("llava", "prumerge+", "padded", llm_precision="int4")]


@pytest.fixture(scope="module")
def report(artifacts):
    return run(artifacts, ["none", "prumerge", "prumerge+"], synthetic=2, warmup=1, runs=2, max_new_tokens=4)


def test_every_stage_for_every_method_and_totals_add_up(report):
    assert [m.method for m in report.methods] == ["none", "prumerge", "prumerge+"]
    for m in report.methods:
        assert m.samples == 4  # runs x images; the warm-up run is not among them
        for stage in (*STAGE_ORDER, "vision", "end_to_end", "ttft"):
            assert m.stages[stage]["n"] == 4 and m.stages[stage]["p50"] >= 0, (m.method, stage)
        # accounting, not timing (a busy machine stretches any margin): the stages are disjoint parts of the run,
        # so what is left over is never negative, and stages + overhead add up to end-to-end exactly
        assert m.overhead_ms["min"] >= -1e-6
        stage_means = sum(m.stages[s]["mean"] for s in STAGE_ORDER)
        assert stage_means + m.overhead_ms["mean"] == pytest.approx(m.stages["end_to_end"]["mean"], rel=1e-9, abs=1e-6)
        vision_parts = sum(m.stages[s]["mean"] for s in ("vision_encoder", "reducer", "projector", "vision_other"))
        assert vision_parts == pytest.approx(m.stages["vision"]["mean"], rel=1e-6)
        assert abs(sum(m.node_share.values()) - 1) < 1e-3  # shares are rounded to 4 decimals
        assert m.stages["ttft"]["p50"] <= m.stages["end_to_end"]["p50"] + 1e-6
    assert report.method("none").visual_tokens == {"mean": 64, "min": 64, "max": 64}
    assert report.method("prumerge").visual_tokens["max"] < 64
    assert report.method("prumerge").node_share["reducer"] > 0 and report.method("none").node_share["reducer"] == 0


def test_json_and_png(report, tmp_path):
    data = json.loads(write_json(report, tmp_path / "r.json").read_text())
    assert data["schema_version"] == 1 and data["config"]["runs"] == 2
    for m in data["methods"]:
        assert set(STAGE_ORDER) <= set(m["stages"]) and {"p50", "p90", "p99", "mean"} <= set(m["stages"]["decode"])
    png = plot(report, tmp_path / "r.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (1000, 600)


def test_vision_nodes_are_attributed(artifacts):
    stages = classify_nodes(artifacts[0] / "vision.onnx")
    counts = {s: sum(1 for v in stages.values() if v == s) for s in set(stages.values())}
    assert counts["vision_encoder"] > 50 and counts["reducer"] > 20 and counts["projector"] >= 3


def test_bad_arguments(artifacts, tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        run(artifacts, ["fast"], synthetic=1)
    with pytest.raises(ConfigError, match="runs must be >= 1"):
        run(artifacts, ["prumerge"], synthetic=1, runs=0)
    with pytest.raises(InputError, match="no images"):
        run(artifacts, ["prumerge"])
    with pytest.raises(InputError, match="not found"):
        run(artifacts, ["prumerge"], images=[tmp_path / "missing.jpg"])
    with pytest.raises(ConfigError, match="no artifact provides none"):
        run(artifacts[1:], ["none"], synthetic=1)


def test_profile_cli(artifacts, tmp_path):
    result = CliRunner().invoke(main, ["profile", *map(str, artifacts), "--synthetic", "1", "--runs", "1", "--warmup", "0",
                                       "--methods", "none,prumerge+", "--max-new-tokens", "2",
                                       "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "vision_encoder" in result.output and "reducer share" in result.output
    assert (tmp_path / "p.png").is_file() and json.loads((tmp_path / "p.json").read_text())["methods"][1]["method"] == "prumerge+"
    bad = CliRunner().invoke(main, ["profile", str(artifacts[0]), "--synthetic", "1", "--methods", "nope"])
    assert bad.exit_code == 2 and "unknown method" in bad.output


# ------------------------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_inspect_marks_exactly_what_the_reducer_kept(llava_dir, tmp_path, method):
    from prumerge.heatmap import SAMPLED, KEPT, render

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
    result = render(image, llava_dir, method=method, out=tmp_path / "x.png")
    assert result.kept + result.sampled == result.reducer_indices
    assert result.num_tokens == len(result.reducer_indices) + 1
    if method == "prumerge":
        assert not result.sampled
    else:
        assert result.sampled
    with Image.open(result.path) as png:
        assert png.size == result.size == (2 * 2 * 112, 2 * 112 + 56)
        pixels = np.asarray(png.convert("RGB"))
    cell = 14 * 2
    for patch, colour in [(result.kept[0], KEPT)] + ([(result.sampled[0], SAMPLED)] if result.sampled else []):
        row, col = divmod(patch, 8)
        x0, y0 = 2 * 112 + col * cell, row * cell  # right panel, the patch's top-left border pixel
        assert tuple(pixels[y0 + cell // 2, x0]) == colour, "the outline of that patch is drawn in its colour"


def test_inspect_cli_and_artifact_model(artifact_factory, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(image)
    directory = artifact_factory("llava", "prumerge", "padded")
    result = CliRunner().invoke(main, ["inspect", str(image), "--model", str(directory), "--out", str(tmp_path / "i.png")])
    assert result.exit_code == 0, result.output
    assert "kept patches by attention" in result.output and (tmp_path / "i.png").is_file()
    usage = CliRunner().invoke(main, ["inspect", str(image)])
    assert usage.exit_code == 2 and "--model" in usage.output


def test_memory_figures_are_the_artifacts_files_and_the_decoders_geometry(report, artifacts):
    """Each method's artifact bytes by part add up to the manifest's own records of those files, and the KV cache
    is the decoder's layers x 2 x KV heads x head size x element size at the most positions a run reached."""
    from prumerge.artifact.manifest import Manifest

    manifest = Manifest.read(artifacts[0])
    llm = manifest.llm
    for m in report.methods:
        graph = manifest.baseline if m.method == "none" else Manifest.read(m.artifact).vision
        vision_bytes = sum(meta["bytes"] for name, meta in Manifest.read(m.artifact).files.items()
                           if name.split(".onnx")[0] == graph.file.split(".onnx")[0])
        assert m.artifact_mb["vision"] == pytest.approx(vision_bytes / (1 << 20), abs=0.01)
        assert m.artifact_mb["llm_decoder"] > 0 and m.artifact_mb["embeddings"] > 0
        assert m.positions_max >= m.visual_tokens["max"] + 1
        per_position = llm.num_layers * 2 * llm.num_kv_heads * llm.head_size * np.dtype(llm.kv_dtype).itemsize
        assert m.kv_cache_mb == pytest.approx(per_position * m.positions_max / (1 << 20), abs=1e-3)
