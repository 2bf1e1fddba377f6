"""Build options are typed stages, checked when made (before any checkpoint is read), and the command line's flags
land in the stage that uses them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from prumerge.cli import main
from prumerge.errors import ConfigError
from prumerge.export.options import BuildOptions, GraphOptions, Int8Options, LlmOptions
from prumerge.export.tensorrt import EngineOptions
from prumerge.reduce.config import Method, ReducerConfig


@pytest.mark.parametrize("make, message", [
    (lambda: BuildOptions(ReducerConfig(method="none", capacity=8)), "not to method none"),
    (lambda: BuildOptions(int8=Int8Options()), "needs --calibration"),
    (lambda: BuildOptions(graph=GraphOptions(batch_max=2), engine=EngineOptions.for_target("server", max_batch=4)),
     "exceeds the graph's exported limit 2"),
    (lambda: BuildOptions(graph=GraphOptions(opset=99)), "opset 99 is not available"),
    (lambda: BuildOptions(engine={"target": "server"}), "must be EngineOptions"),
    (lambda: GraphOptions(contract="ragged"), "unknown output contract"),
    (lambda: GraphOptions(batch_max=0), "batch_max must be an integer >= 1"),
    (lambda: GraphOptions(validate_images=True), "validate_images must be an integer"),
    (lambda: LlmOptions(precision="int3"), "unknown LLM precision"),
    (lambda: LlmOptions(provider="tpu"), "unknown LLM provider"),
    (lambda: LlmOptions(kv_cache="bf16"), "unknown KV cache"),
    (lambda: LlmOptions(kv_cache="int8", provider="cuda"), "--llm-kv-cache int8 is for decoders with float32 inputs"),
    (lambda: LlmOptions(kv_cache="int8", precision="fp16"), "--llm-kv-cache int8 is for decoders with float32 inputs"),
    (lambda: LlmOptions(kv_cache="mixed", provider="cuda"), "--llm-kv-cache mixed is for decoders with float32 inputs"),
    (lambda: Int8Options(method="mse"), "unknown calibration method"),
    (lambda: Int8Options(float_layers=-1), "float_layers must be an integer >= 0"),
])
def test_invalid_combinations_are_refused_when_the_options_are_made(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_the_command_line_maps_each_flag_to_its_stage(tmp_path, monkeypatch):
    import prumerge.export.build as build

    seen = {}

    def fake_build(model, out, options, force=False, progress=None):
        seen["options"], seen["force"] = options, force
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(build, "build_artifact", fake_build)
    result = CliRunner().invoke(main, [
        "build", "some/model", "--out", str(tmp_path / "o"), "--method", "prumerge+", "--max-tokens", "40",
        "--output", "dynamic", "--fp16", "--batch-max", "4", "--neighbors", "8", "--order", "spatial", "--no-llm",
        "--target", "jetson-orin", "--precision", "int8", "--calibration", str(tmp_path / "cal.json"),
        "--calibration-method", "entropy", "--int8-float-layers", "1", "--no-slim", "--image-size", "196",
        "--base", "base/llm", "--vision-tower", "my/tower", "--revision", "v2", "--baseline", "--force"])
    assert "stopped by the test" in result.output, result.output
    options = seen["options"]
    assert options.reducer == ReducerConfig(method=Method.PRUMERGE_PLUS, capacity=40, neighbors=8, order="spatial")
    assert options.graph == GraphOptions(contract="dynamic", fp16=True, batch_max=4, slim=False, image_size=196, baseline=True)
    assert (options.source.base, options.source.vision_tower, options.source.revision) == ("base/llm", "my/tower", "v2")
    assert options.llm is None and seen["force"]
    assert options.engine == EngineOptions.for_target("jetson-orin", precision="int8") and not options.engine.build_here
    assert options.int8 == Int8Options(method="entropy", float_layers=1)
    assert options.calibration == str(tmp_path / "cal.json")

    seen.clear()
    result = CliRunner().invoke(main, ["build", "some/model", "--out", str(tmp_path / "o"), "--method", "none",
                                       "--attention", "per_head", "--engine"])
    options = seen["options"]
    assert options.reducer == ReducerConfig(method="none")  # reducer flags mean nothing to the unreduced graph
    assert options.llm == LlmOptions("auto") and options.int8 is None
    assert options.engine.target == "server" and options.engine.build_here and options.graph.opset == 18

    seen.clear()  # the KV cache: auto (mixed on the CPU provider, float elsewhere) unless one is asked for
    CliRunner().invoke(main, ["build", "some/model", "--out", str(tmp_path / "o"), "--llm-kv-cache", "int8"])
    assert seen["options"].llm == LlmOptions("auto", kv_cache="int8") and LlmOptions().kv_cache == "auto"
    assert [LlmOptions().kv_cache_for(p) for p in ("int4", "fp32", "fp16")] == ["mixed", "mixed", "float"]
    assert LlmOptions(provider="cuda").kv_cache_for("int4") == "float"
    assert LlmOptions(kv_cache="float").kv_cache_for("int4") == "float"

    seen.clear()  # fused attention is asked for by its opset
    CliRunner().invoke(main, ["build", "some/model", "--out", str(tmp_path / "o"), "--no-llm", "--opset", "23"])
    assert seen["options"].graph.opset == 23


def test_a_bad_combination_is_one_line_before_the_model_is_touched(tmp_path, monkeypatch):
    import prumerge.export.build as build

    monkeypatch.setattr(build, "build_artifact", lambda *a, **k: pytest.fail("built before checking the options"))
    for args, message in [
        (["--method", "none", "--max-tokens", "5"], "not to method none"),
        (["--precision", "int8"], "needs --calibration"),
        (["--target", "server", "--batch-max", "2", "--max-batch", "4"], "exceeds the graph's exported limit"),
        (["--target", "server", "--precision", "int8", "--calibration", "c.json", "--calibration-method", "per-token"],
         "TensorRT builds INT8 from an explicit Q/DQ graph"),
        (["--precision", "int8", "--calibration", "c.json", "--int8-float-layers", "1", "--int8-target-jaccard", "0.9"],
         "not both"),
    ]:
        result = CliRunner().invoke(main, ["build", "some/model", "--out", str(tmp_path / "o"), "--no-llm", *args])
        assert result.exit_code not in (0, 1) and message in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
