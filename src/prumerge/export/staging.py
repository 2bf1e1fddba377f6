"""Writing an artifact directory so that nothing is lost and nothing half-written is left: staging beside the
target, one exclusive lock per target, stale leftovers of killed builds found by name, ``--force`` only on what
prumerge wrote. (The build side; the runtime only reads finished artifacts.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..artifact.manifest import FORMAT, MANIFEST_NAME
from ..errors import ArtifactError

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
                _replace(target, staging, force)
            except BaseException:  # a failed build or a refused rename: nothing of ours is left
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
