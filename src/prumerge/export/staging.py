"""Writing an artifact directory so that nothing is lost and nothing half-written is left: staging beside the
target, one exclusive lock per target, stale leftovers of killed builds found by name, ``--force`` only on what
the same command wrote, never on its own inputs. (The build side; the runtime only reads finished artifacts.)

Replacing an existing directory (``--force``) swaps the new one in with one ``renameat2(RENAME_EXCHANGE)`` on
Linux: at every instant either the old or the new directory is at the target. Where that call is missing (another
OS, a filesystem without it) the old directory is first renamed to ``.NAME.old-PID`` and the new one renamed in;
a process killed between the two leaves the old one there, and the next command on that target *restores* it
(:func:`remove_stale`), never deletes it.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..artifact.manifest import FORMAT, MANIFEST_NAME
from ..errors import ArtifactError

OWNED_MARKER = ".prumerge-owned"  # written into non-artifact directories prumerge creates, with their kind
KINDS = ("artifact", "triton", "checkpoint")  # what each command writes: only the same kind may replace it


def owner_kind(target: Path) -> str | None:
    """What prumerge wrote ``target`` as: ``artifact`` (a prumerge manifest, even when the rest was tampered with),
    the kind its marker names (``triton``, ``checkpoint``), ``legacy`` for a marker of older releases that named
    none, or None (not prumerge's)."""
    if (target / OWNED_MARKER).is_file():
        try:
            found = re.search(r"^kind: (\w+)$", (target / OWNED_MARKER).read_text(errors="replace"), re.MULTILINE)
        except OSError:
            return None
        return found.group(1) if found else "legacy"
    try:
        data = json.loads((target / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return "artifact" if isinstance(data, dict) and data.get("format") == FORMAT else None


def is_replaceable(target: Path, kind: str = "artifact") -> bool:
    """What ``--force`` may delete: an empty directory, or one prumerge wrote as this same ``kind`` (a build may
    replace an artifact, not a Triton repository; ``triton`` a repository, not an artifact). Never anything else:
    not ``.``, not a home, not a directory a symlink stands for."""
    if not target.is_dir() or target.is_symlink():
        return False
    if not any(target.iterdir()):
        return True
    found = owner_kind(target)
    return found == kind or (found == "legacy" and kind != "artifact")


def refuse_overlap(target: Path, inputs) -> None:
    """Refuse an output that is, contains or lies inside one of the command's own local inputs (``--force`` would
    delete the input, or the build would write into it)."""
    target = Path(target).resolve()
    for given in inputs:
        if not given:
            continue
        path = Path(given)
        if not path.exists():
            continue  # a hub id, not a local path
        path = path.resolve()
        if path == target or path in target.parents or target in path.parents:
            raise ArtifactError(f"--out {target} overlaps the input {path}: choose an --out outside the inputs "
                                "(and not holding them)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path) -> list:
    """Leftovers of earlier runs on ``target`` whose process is gone (SIGKILL, power loss), named
    ``.NAME.partial-PID-*`` / ``.NAME.convert-PID-*`` (removed) and ``.NAME.old-PID`` (the previous directory of an
    interrupted replace: put back when nothing is at ``target``, else removed). Names are matched exactly: the
    target's name is escaped for the glob and the PID parsed whole, so another target's leftovers are never taken."""
    removed = []
    for kind in ("partial", "convert", "old"):
        prefix = f".{target.name}.{kind}-"
        pattern = re.compile(re.escape(prefix) + (r"(\d+)" if kind == "old" else r"(\d+)-.+"))
        for path in target.parent.glob(glob.escape(prefix) + "*"):
            match = pattern.fullmatch(path.name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid == os.getpid() or _pid_alive(pid):
                continue
            if kind == "old" and not os.path.lexists(target) and path.is_dir() and not path.is_symlink():
                os.replace(path, target)  # the replace was cut between its two renames: the old one comes back
                removed.append(path)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


_STOP: list = []


def request_stop(code: int) -> None:
    """Remember that the process was told to stop (the CLI's SIGTERM handler). The handler also raises SystemExit,
    but Python drops an exception raised while a finalizer (``__del__``, a weakref callback) runs, and torch's export
    runs many: seen under load, a SIGTERM'd build then finished and published its artifact, exit 0. A staged
    directory checks this before it is published, so a stop that was dropped still stops the build there."""
    _STOP.append(int(code))


def stop_if_requested() -> None:
    if _STOP:
        raise SystemExit(_STOP[0])


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """An exclusive lock on ``target`` for the whole build (``.NAME.lock`` beside it): a second build into the same
    directory fails at once with the holder's PID instead of silently replacing the first one's result."""
    import fcntl

    lock_path = target.parent / f".{target.name}.lock"
    while True:
        handle = _open_lock(lock_path)
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


def _open_lock(lock_path: Path):
    """The lock file, opened without following a symlink and refused unless it is a plain file with one name (a
    link or a hard link there would make the PID write truncate a file elsewhere)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactError(f"{lock_path} is a symbolic link; prumerge will not write through it (remove it)") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise ArtifactError(f"{lock_path} is not a plain file of its own (a hard link or a special file); remove it")
    return os.fdopen(fd, "r+")


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
def staged_directory(target: str | os.PathLike, force: bool = False, kind: str = "artifact", inputs=()) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success it replaces ``target`` by rename, on failure it is removed.

    An interrupted or failed build therefore never leaves anything at ``target`` that looks like an artifact; one
    killed outright leaves a staging directory that the next build of the same target removes. The build holds
    an exclusive lock on ``target``; ``force`` replaces only what :func:`is_replaceable` allows for this ``kind``,
    and the target is checked again at the final swap (another process may have created it meanwhile). ``kind``
    other than ``artifact`` (a converted checkpoint, a Triton repository) is written into :data:`OWNED_MARKER`.
    ``inputs``: the command's local inputs, which ``target`` may not be, hold or lie inside.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    target = Path(target).resolve()
    refuse_overlap(target, inputs)
    if target.exists() and not force:
        raise ArtifactError(f"{target} already exists; pass --force to replace it")
    if target.exists() and not is_replaceable(target, kind):
        what = {"artifact": "a prumerge artifact (no prumerge manifest)", "triton": "a Triton repository prumerge wrote",
                "checkpoint": "a checkpoint prumerge converted"}[kind]
        raise ArtifactError(f"{target} exists and is not {what}; --force replaces only what this command writes and "
                            "empty directories: remove it yourself or choose another --out")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with build_lock(target):
            remove_stale(target)
            if target.exists() and not force:  # an interrupted replace was just restored
                raise ArtifactError(f"{target} already exists (restored from an interrupted replace); pass --force to replace it")
            try:
                staging = scratch_directory(target, "partial")
                if kind != "artifact":  # mark it so that a later --force of the same command may replace it
                    (staging / OWNED_MARKER).write_text(f"written by prumerge; --force of the same command may replace it\nkind: {kind}\n")
                yield staging
                stop_if_requested()  # a signal whose exit was dropped: nothing is published
                _apply_umask(staging)
                _replace(target, staging, force, kind)
            except BaseException:  # a failed build, a refused rename, a signal: nothing of ours is left
                # by this process's name, not the variable: a SIGTERM can land after mkdtemp made the directory and
                # before it was assigned (seen under load: the staging directory outlived the signal)
                for mine in target.parent.glob(glob.escape(f".{target.name}.partial-{os.getpid()}-") + "*"):
                    shutil.rmtree(mine, ignore_errors=True)
                raise
    except OSError as exc:  # read-only or full disk, permissions: one line naming the file, not a traceback
        raise ArtifactError(f"building {target} failed: {exc.strerror or exc} ({exc.filename or target})") from exc


def _apply_umask(root: Path) -> None:
    """Give every file and folder of the result the user's umask: some writers (onnx's external data, temp files)
    create 0600 files, and one unreadable file makes an artifact unusable for the service user that runs it."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        path.chmod((0o777 if executable else 0o666) & ~mask)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(target: Path, staging: Path, force: bool, kind: str = "artifact") -> None:
    if target.exists() or target.is_symlink():
        if not force:
            raise ArtifactError(f"{target} was created by someone else during this build; nothing was replaced "
                                "(the finished build was discarded)")
        if not is_replaceable(target, kind):
            raise ArtifactError(f"{target} is no longer what this command writes; nothing was replaced")
        if exchange(staging, target):  # atomic: the old directory is now at the staging name
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)  # a kill here leaves `old`: the next command on the target restores it
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
