"""The artifact contract: ``manifest.json``, the only thing a build and a run share (stdlib only).

The build records what it *measured* (real output shapes, validation errors, file hashes), not what it intended;
the runtime trusts nothing else. The manifest carries its own hash, so an edited manifest is refused just like an
edited graph file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ArtifactError

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
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ArtifactError(f"{path} lacks required fields: {exc}") from exc

    def verify_files(self, directory: str | os.PathLike) -> None:
        """Every recorded file exists with its recorded size and sha256."""
        directory = Path(directory)
        for name, meta in sorted(self.files.items()):
            path = directory / name
            if not path.is_file():
                raise ArtifactError(f"artifact file missing: {path}")
            if path.stat().st_size != meta["bytes"]:
                raise ArtifactError(f"artifact file {path} has {path.stat().st_size} bytes, the build wrote {meta['bytes']}; it was modified or truncated")
            if sha256_file(path) != meta["sha256"]:
                raise ArtifactError(f"artifact file {path} does not match its sha256 in the manifest; it was modified")


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


@contextmanager
def staged_directory(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success it replaces ``target`` by rename, on failure it is removed.

    An interrupted or failed build therefore never leaves anything at ``target`` that looks like an artifact.
    """
    target = Path(target).resolve()
    if target.exists() and not force:
        raise ArtifactError(f"{target} already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
