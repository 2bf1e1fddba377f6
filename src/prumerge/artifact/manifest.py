"""The artifact contract: ``manifest.json``, the only thing a build and a run share (stdlib only).

The build records what it *measured* (real output shapes, validation errors, file hashes), not what it intended;
the runtime trusts nothing else.

What the hashes protect against, and what not: every file's sha256 is in the manifest and the manifest carries a
hash of itself, so corruption, truncation, a half-copied directory or an edit of any one file is refused. Anyone
can recompute the manifest's own hash, so it is no protection against a deliberate edit of the whole artifact.
For that, pin the manifest's hash you got from the builder out of band (``run/verify --expect-sha256``): every
file is checked against the pinned manifest. Every path a manifest names is confined to the artifact directory
(no absolute paths, no ``..``, no links out), and every file the runtime opens must be listed and hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
from pathlib import Path, PurePosixPath

from ..errors import ArtifactError
from .contract import ADAPTIVE_METHODS
from .preprocess_config import PreprocessConfig
# the sections, read by attribute and checked when read; importable from here, where the manifest is
from .fields import DecoderIO, Section, TensorSpec  # noqa: F401
from .graph_facts import EngineFacts, EngineTarget, Int8Record, OpSupport, SelectionAgreement  # noqa: F401
from .sections import (GraphSection, LLMSection, ReducerSection, SourceSection, TextSection, ValidationSection,  # noqa: F401
                       _preprocess)

FORMAT = "prumerge-artifact"
FORMAT_VERSION = 3  # 2: typed sections, one owner per fact; 3: the decoder's cache names written out per layer
MANIFEST_NAME = "manifest.json"


_SECTIONS = {"source": SourceSection, "reducer": ReducerSection, "vision": GraphSection, "baseline": GraphSection,
             "llm": LLMSection, "text": TextSection}


@dataclasses.dataclass
class Manifest:
    source: SourceSection
    reducer: ReducerSection
    vision: GraphSection
    preprocess: PreprocessConfig  # prumerge.artifact.preprocess_config owns its fields
    llm: LLMSection | None = None
    baseline: GraphSection | None = None  # the unreduced (method none) graph, when the build exported it
    text: TextSection | None = None  # CLIP's text graph, when the reducer compares the question in CLIP's space
    packages: dict = dataclasses.field(default_factory=dict)
    files: dict = dataclasses.field(default_factory=dict)
    created_utc: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, section in _SECTIONS.items():
            setattr(self, name, section.from_dict(getattr(self, name), name))
        self.preprocess = _preprocess(self.preprocess)
        if not isinstance(self.files, dict) or not all(
                isinstance(name, str) and isinstance(meta, dict) and isinstance(meta.get("sha256"), str)
                and len(meta["sha256"]) == 64 and isinstance(meta.get("bytes"), int) and not isinstance(meta["bytes"], bool)
                and meta["bytes"] >= 0 for name, meta in self.files.items()):
            raise ArtifactError("manifest field files must map each file name to its bytes and sha256")
        # the image size is recorded by three owners (reducer, preprocessing, each graph's input): they must agree
        sizes = {"reducer.image_size": self.reducer.image_size, "preprocess.image_size": self.preprocess.image_size}
        for name, graph in (("vision", self.vision), ("baseline", self.baseline)):
            if graph is not None:
                sizes[f"{name}.inputs[0].shape"] = tuple(graph.inputs[0].shape[2:])
        if self.text is not None and (len(self.vision.inputs) < 2 or self.vision.inputs[1].shape[-1] != self.text.width):
            raise ArtifactError(f"manifest field text.width is {self.text.width} but the vision graph takes no question "
                                "rows of that width: it does not describe one artifact")
        if len({v if isinstance(v, tuple) else (v, v) for v in sizes.values()}) != 1:
            raise ArtifactError("the manifest's image sizes disagree (" + ", ".join(f"{k} {v}" for k, v in sizes.items())
                                + "): it does not describe one artifact")

    @property
    def validation(self) -> ValidationSection | None:
        """The main graph's validation (each graph section owns its own)."""
        return self.vision.validation

    @property
    def method(self) -> str:
        """The method of the artifact's main vision graph."""
        return self.vision.method

    def summary_rows(self) -> list:
        """``[(label, text)]``: what ``build`` and ``inspect`` print about this artifact."""
        vision, reducer, validation = self.vision, self.reducer, self.validation
        rows = [("source", str(self.source.model)),
                ("method", f"{vision.method}  " + (f"(capacity {vision.capacity} of {reducer.num_patches} patches + extra)"
                                                   if vision.method in ADAPTIVE_METHODS else
                                                   f"({vision.capacity} tokens of {reducer.num_patches} patches)")),
                ("graph", f"{vision.file}  {vision.contract} contract, opset {vision.opset} ({vision.attention} "
                          f"attention), {vision.precision}"),
                ("outputs", "; ".join(f"{o.name} {o.shape} {o.dtype}" for o in vision.outputs))]
        if validation is not None:
            rows.append(("validation", validation.line()))
        rows.append(("input", f"{reducer.image_size} px, {reducer.grid}x{reducer.grid} patches"))
        if vision.int8:
            rows.append(("INT8", vision.int8.line()))
        rows.append(("TensorRT", "; ".join(f"{version}: {report.line()}" for version, report in vision.tensorrt.items())))
        llm = self.llm
        rows.append(("LLM", f"{llm.model_type} {llm.precision} decoder ({llm.builder}), hidden {llm.hidden_size}, "
                     f"{llm.kv_cache_kind} KV cache" if llm is not None and llm.decoder else "none in this artifact"))
        if vision.reducer_graph:
            rows.append(("question", f"read by the reducer ({vision.inputs[1].shape[-1]}-wide rows); a second question "
                                     f"on an image runs {vision.reducer_graph} alone"))
        if self.text is not None:
            rows.append(("text graph", f"{self.text.directory}/{self.text.graph}: CLIP text from {self.text.source}, "
                                       f"{self.text.positions}-token segments, {self.text.width}-wide"))
        if self.baseline:
            rows.append(("baseline", f"{self.baseline.file} (method none, {self.baseline.capacity} tokens)"))
        rows.append(("files", ", ".join(f"{n} ({m['bytes'] / 1e6:.1f} MB)" for n, m in self.files.items())))
        rows.append(("manifest sha256", f"{self.sha256}  (publish it; users pin it with --expect-sha256)"))
        return rows

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["manifest_sha256"] = _self_hash(data)
        return data

    def write(self, directory: Path) -> Path:
        """Write atomically (temp file + rename): a reader never sees half a manifest."""
        path = Path(directory) / MANIFEST_NAME
        write_atomically(path, lambda partial: partial.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"))
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        """Parse and check format, version and the manifest's own hash (not the files: see :meth:`verify_files`)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"artifact directory not found: {directory}")
        path = directory / MANIFEST_NAME
        if path.is_symlink():
            raise ArtifactError(f"{path} is a symbolic link; an artifact's manifest must be a file inside it")
        if not path.is_file():
            raise ArtifactError(f"{directory} has no {MANIFEST_NAME}; not a prumerge artifact (or an interrupted build)")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has format version {data.get('format_version')}; this prumerge reads version {FORMAT_VERSION}. "
                "Rebuild the artifact with this version of prumerge-export."
            )
        recorded = data.pop("manifest_sha256", None)
        if recorded != _self_hash(data):
            raise ArtifactError(f"{path} was edited after the build (its manifest_sha256 no longer matches); rebuild it")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"{path} has unknown field(s) {', '.join(unknown)}")
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ArtifactError(f"{path} lacks required fields: {exc}") from exc
        manifest.recorded_sha256 = recorded
        return manifest

    @property
    def sha256(self) -> str:
        """The manifest's own hash (what ``--expect-sha256`` pins)."""
        return getattr(self, "recorded_sha256", None) or _self_hash(dataclasses.asdict(self))

    def referenced_files(self) -> list:
        """Every file the runtime opens, as manifest-relative names (each must be listed in ``files``)."""
        names = []
        for graph in (self.vision, self.baseline):
            if graph:
                names.append(graph.file)
                names += [n for n in self.files if n.startswith(graph.file + ".") and n.endswith(".data")]
                if graph.engine:
                    names.append(graph.engine.file)
        if self.llm and self.llm.decoder:
            base = self.llm.directory
            names += [f"{base}/{name}" for name in (self.llm.decoder, self.llm.embeddings, self.llm.tokenizer)]
            names += [n for n in self.files if n.startswith(base + "/")]
        return sorted(set(names))

    def verify_files(self, directory: str | os.PathLike, expect_sha256: str | None = None) -> None:
        """Every recorded file exists with its recorded size and sha256, every path stays inside ``directory``,
        every file the runtime opens is recorded; with ``expect_sha256``, the manifest is the one pinned."""
        directory = Path(directory)
        if expect_sha256 is not None and expect_sha256.strip().lower() != self.sha256:
            raise ArtifactError(f"{directory}: the manifest's sha256 is {self.sha256}, not the pinned {expect_sha256.strip()}; "
                                "this is not the artifact you expected")
        for name in self.files:
            inside(directory, name)
        unlisted = [n for n in self.referenced_files() if n not in self.files]
        if unlisted:
            raise ArtifactError(f"{directory}: the manifest names files it does not hash: {', '.join(unlisted)}")
        if not self.files:
            raise ArtifactError(f"{directory}: the manifest lists no files; not a complete artifact")
        for name, meta in sorted(self.files.items()):
            path = inside(directory, name)
            if not path.is_file():
                raise ArtifactError(f"artifact file missing: {path}")
            if path.stat().st_size != meta["bytes"]:
                raise ArtifactError(f"artifact file {path} has {path.stat().st_size} bytes, the build wrote {meta['bytes']}; it was modified or truncated")
            if sha256_file(path) != meta["sha256"]:
                raise ArtifactError(f"artifact file {path} does not match its sha256 in the manifest; it was modified")
        self._check_external_data(directory)

    def _check_external_data(self, directory: Path) -> None:
        """Every file a listed ONNX graph makes onnxruntime read (its external data) is itself listed and hashed:
        a graph pointing at an unlisted or outside file is refused, so the pinned hash covers all that runs."""
        from .onnx_files import external_data_locations

        for name in sorted(n for n in self.files if n.endswith(".onnx")):
            for location in sorted(external_data_locations(inside(directory, name))):
                pure = PurePosixPath(location)
                target = posixpath.normpath(str(PurePosixPath(name).parent / pure)) if location else ""
                if not location or pure.is_absolute() or target.startswith("../") or target not in self.files:
                    raise ArtifactError(f"{directory}: graph {name} reads external data from {location!r}, which the "
                                        "manifest does not hash; refused")
                inside(directory, target)


def inside(directory: str | os.PathLike, name: str) -> Path:
    """``directory / name`` when ``name`` is a plain relative path that resolves inside ``directory``; else an
    ArtifactError (absolute paths, ``..``, links that leave the directory)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ArtifactError(f"the manifest names an invalid path {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise ArtifactError(f"the manifest names {name!r}, outside the artifact directory; refused")
    root = Path(directory).resolve()
    path = (root / pure).resolve()
    if path != root and root not in path.parents:
        raise ArtifactError(f"the manifest names {name!r}, which resolves outside the artifact directory; refused")
    return root / pure


def _self_hash(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_atomically(path: Path, write) -> None:
    """``write(partial)`` into ``.NAME.partial`` beside ``path``, then one rename over it: a reader (or a process
    killed mid-write) never sees half a file; the previous one stays whole until the new one is complete."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    os.replace(partial, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path) -> dict:
    """``{relative name: {sha256, bytes}}`` for every file under ``directory`` except the manifest."""
    out = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            out[str(path.relative_to(directory))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out
