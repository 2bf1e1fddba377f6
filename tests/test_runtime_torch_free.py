"""The device side runs with torch and transformers made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "transformers", "torchvision", "onnxscript"):
                raise ImportError(f"{name} is blocked: the runtime must not import it")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def test_vision_session_and_pipeline_without_torch(artifact_factory, tmp_path):
    directory = artifact_factory("llava", "prumerge+", "dynamic", llm_precision="int4")
    image = tmp_path / "img.png"
    from PIL import Image
    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(image)
    from prumerge.runtime import Pipeline

    expected = Pipeline.from_artifacts(directory).generate(str(image), "<image> describe", max_new_tokens=4).token_ids
    assert expected
    script = BLOCKER + textwrap.dedent(
        f"""
        import prumerge, prumerge.runtime
        from prumerge.runtime import VisionSession
        out = VisionSession.open({str(directory)!r}).run([{str(image)!r}, {str(image)!r}])
        assert out.num_tokens[0] == out.num_tokens[1]
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print("tokens", out.tokens.shape, out.num_tokens.tolist())
        from prumerge.runtime import Pipeline
        result = Pipeline.from_artifacts({str(directory)!r}).generate({str(image)!r}, "<image> describe", max_new_tokens=4)
        assert result.token_ids == {expected!r}, result.token_ids  # what the same pipeline gives with torch loaded
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print("generated", result.token_ids, result.visual_tokens)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tokens (2," in result.stdout and "generated" in result.stdout


def test_cli_in_a_runtime_only_install(artifact_factory, clip_dir):
    """torch, transformers and onnx absent: verify (hashes + graph run), inspect and profile node stages work from
    the artifact alone; a build-side command fails with one line naming the extra."""
    directory = artifact_factory("llava", "prumerge", "padded")
    absent = BLOCKER.replace('("torch", "transformers", "torchvision", "onnxscript")',
                             '("torch", "transformers", "torchvision", "onnxscript", "onnx")')
    absent = absent.replace('raise ImportError(f"{name} is blocked: the runtime must not import it")',
                            'raise ModuleNotFoundError(f"No module named {name!r}", name=name)')  # as if not installed
    assert "ModuleNotFoundError" in absent
    script = absent + textwrap.dedent(
        f"""
        import json
        from click.testing import CliRunner
        from prumerge.cli import main
        verify = CliRunner().invoke(main, ["verify", {str(directory)!r}])
        assert verify.exit_code == 0, verify.output
        assert "skipped: the PyTorch comparison needs prumerge[export]" in verify.output
        inspect = CliRunner().invoke(main, ["inspect", {str(directory)!r}, "--json"])
        assert inspect.exit_code == 0, inspect.output
        graph = json.loads(inspect.stdout)["graph"]
        assert graph["ops"] is None and graph["stages"]["reducer"] > 0 and graph["nodes"] > 0
        build = CliRunner().invoke(main, ["build", {str(clip_dir)!r}, "--out", "never", "--no-llm"])
        assert build.exit_code == 8, build.output
        assert "`prumerge-export build` needs the build side" in build.output and "pip install 'prumerge[export]'" in build.output
        assert "Traceback" not in build.output
        assert "torch" not in sys.modules and "onnx" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.strip().endswith("ok")
