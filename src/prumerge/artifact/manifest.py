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
from pathlib import Path, PurePosixPath

from ..errors import ArtifactError

FORMAT = "prumerge-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass
class Manifest:
    source: dict
    reducer: dict
    vision: dict
    preprocess: dict
    llm: dict | None = None
    baseline: dict | None = None  # the unreduced (method none) graph, when the build exported it
    validation: dict = dataclasses.field(default_factory=dict)
    packages: dict = dataclasses.field(default_factory=dict)
    files: dict = dataclasses.field(default_factory=dict)
    created_utc: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["manifest_sha256"] = _self_hash(data)
        return data

    def write(self, directory: Path) -> Path:
        """Write atomically (temp file + rename): a reader never sees half a manifest."""
        path = Path(directory) / MANIFEST_NAME
        partial = path.with_name(f".{MANIFEST_NAME}.partial")
        partial.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(partial, path)
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        """Parse and check format, version and the manifest's own hash (not the files: see :meth:`verify_files`)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"artifact directory not found: {directory}")
        path = directory / MANIFEST_NAME
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
                names.append(graph["file"])
                names += [n for n in self.files if n.startswith(graph["file"] + ".") and n.endswith(".data")]
                if graph.get("engine"):
                    names.append(graph["engine"]["file"])
        if self.llm and self.llm.get("decoder"):
            base = self.llm["directory"]
            names += [f"{base}/{self.llm[k]}" for k in ("decoder", "embeddings", "tokenizer")]
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
