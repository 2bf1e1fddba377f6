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
import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
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


OWNED_MARKER = ".prumerge-owned"  # written into non-artifact directories prumerge creates (converted checkpoints)


def is_replaceable(target: Path) -> bool:
    """What ``--force`` may delete: an empty directory, a prumerge artifact (its manifest says so, even when the
    rest was tampered with) or a directory prumerge wrote and marked. Never anything else: not ``.``, not a home."""
    if not target.is_dir() or target.is_symlink():
        return False
    if not any(target.iterdir()):
        return True
    if (target / OWNED_MARKER).is_file():
        return True
    try:
        data = json.loads((target / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path) -> list:
    """Staging and conversion directories of earlier builds of ``target`` whose process is gone (SIGKILL, power
    loss): named ``.NAME.partial-PID-*`` / ``.NAME.convert-PID-*`` / ``.NAME.old-PID``, so they can be found."""
    removed = []
    for kind in ("partial", "convert", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            try:
                pid = int(path.name[len(f".{target.name}.{kind}-"):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """An exclusive lock on ``target`` for the whole build (``.NAME.lock`` beside it): a second build into the same
    directory fails at once with the holder's PID instead of silently replacing the first one's result."""
    import fcntl

    lock_path = target.parent / f".{target.name}.lock"
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ArtifactError(f"another build (pid {holder}) is writing {target}; wait for it or choose another --out") from None
            raise
        try:  # the lock file may have been unlinked by a finishing holder between open and flock: retry on a fresh one
            if os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        handle.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def scratch_directory(target: Path, kind: str) -> Path:
    """A hidden directory beside ``target`` named for :func:`remove_stale`, with the user's umask (not 0700)."""
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
    path.chmod(0o777 & ~_umask())
    return path


@contextmanager
def staged_directory(target: str | os.PathLike, force: bool = False, owned: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success it replaces ``target`` by rename, on failure it is removed.

    An interrupted or failed build therefore never leaves anything at ``target`` that looks like an artifact; one
    killed outright leaves a staging directory that the next build of the same target removes. The build holds
    an exclusive lock on ``target``; ``force`` replaces only what :func:`is_replaceable` allows, and the target is
    checked again at the final rename (another process may have created it meanwhile). ``owned``: the result is
    not an artifact (a converted checkpoint) and carries :data:`OWNED_MARKER` instead of a manifest.
    """
    target = Path(target).resolve()
    if target.exists() and not force:
        raise ArtifactError(f"{target} already exists; pass --force to replace it")
    if target.exists() and not is_replaceable(target):
        raise ArtifactError(f"{target} exists and is not a prumerge artifact (no prumerge manifest); --force replaces "
                            "only artifacts and empty directories: remove it yourself or choose another --out")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with build_lock(target):
            remove_stale(target)
            staging = scratch_directory(target, "partial")
            if owned:  # not an artifact (a converted checkpoint): mark it so a later --force may replace it
                (staging / OWNED_MARKER).write_text("written by prumerge; --force may replace this directory\n")
            try:
                yield staging
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            try:
                _replace(target, staging, force)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except OSError as exc:  # read-only or full disk, permissions: one line naming the file, not a traceback
        raise ArtifactError(f"building {target} failed: {exc.strerror or exc} ({exc.filename or target})") from exc


def _replace(target: Path, staging: Path, force: bool) -> None:
    if target.exists() or target.is_symlink():
        if not force:
            raise ArtifactError(f"{target} was created by someone else during this build; nothing was replaced "
                                "(the finished build was discarded)")
        if not is_replaceable(target):
            raise ArtifactError(f"{target} is no longer a prumerge artifact; nothing was replaced")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
