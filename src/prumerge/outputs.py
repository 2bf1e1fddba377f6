"""Where a command may write: checked before any work, so a run never ends by destroying what it read.

Why one module: every command that writes a report, a picture or an answer folder has inputs of its own (a question
file, images, artifacts, a calibration folder), and a careless path (``--json questions.jsonl``, ``--plot`` onto an
input image, ``--out`` inside an artifact) used to replace an input after the whole run, exit 0. The rules, the same
for every command:

* an output is never one of the command's inputs (compared as resolved paths, so links and ``..`` do not hide it);
* an output never lies inside an artifact (a folder holding a prumerge ``manifest.json``): an artifact is written by
  ``build`` alone, and a file added or replaced there breaks its hashes;
* a file output's folder exists and is writable, the path is not a folder, and a picture's suffix is one the
  plotting library writes; a folder output is a folder (or can be made as one) in a writable place.

Torch-free: the device side's commands use it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .errors import InputError

MANIFEST_NAME = "manifest.json"
PICTURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def artifact_holding(path: Path) -> Path | None:
    """The artifact folder ``path`` is (or lies inside), if any: the nearest folder up from it with a manifest."""
    for folder in [path, *path.parents]:
        if (folder / MANIFEST_NAME).is_file():
            return folder
    return None


def check_outputs(outputs: Iterable[tuple[str, Path | None]], inputs: Iterable[Path | None] = (),
                  folders: Iterable[tuple[str, Path | None]] = (), pictures: Iterable[str] = ()) -> None:
    """Refuse, in one :class:`InputError` naming the flag, any output that would overwrite an input, land in an
    artifact, or cannot be written. ``outputs``: (flag, file path) pairs; ``folders``: (flag, folder path) pairs
    (answer folders); ``pictures``: the flags whose files are pictures (their suffix is checked); ``inputs``: every
    file and folder the command reads (a folder input also protects what lies inside it only when it is an
    artifact)."""
    read = {}
    for item in inputs:
        if item is not None:
            read[_resolved(Path(item))] = Path(item)
    pictures = set(pictures)
    for flag, path in outputs:
        if path is None:
            continue
        path = Path(path)
        _not_an_input(flag, path, read)
        if path.is_dir():
            raise InputError(f"{flag} {path} is a directory; give a file name")
        if not path.parent.is_dir():
            raise InputError(f"{flag} {path}: folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: folder {path.parent} is not writable")
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise InputError(f"{flag} {path} is a link or not a regular file; give another name")
        if path.exists() and not os.access(path, os.W_OK):
            raise InputError(f"{flag} {path} exists and is not writable")
        if flag in pictures and path.suffix.lower() not in PICTURE_SUFFIXES:
            raise InputError(f"{flag} {path}: a picture is written as {', '.join(PICTURE_SUFFIXES)}, not "
                             f"{path.suffix or 'a name without a suffix'!r}")
    for flag, path in folders:
        if path is None:
            continue
        path = Path(path)
        _not_an_input(flag, path, read)
        if path.exists() and not path.is_dir():
            raise InputError(f"{flag} {path} is a file, not a directory")
        existing = next(p for p in [path, *path.parents] if p.exists() or p == Path(p.anchor))
        if not existing.is_dir():
            raise InputError(f"{flag} {path}: {existing} is a file, so no folder can be made under it")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: {existing} is not writable")


def _not_an_input(flag: str, path: Path, read: dict) -> None:
    target = _resolved(path)
    if target in read:
        raise InputError(f"{flag} {path} is one of this command's inputs ({read[target]}); writing it would destroy "
                         "what the command reads: give another path")
    artifact = artifact_holding(target)
    if artifact is not None:
        raise InputError(f"{flag} {path} lies inside the artifact {artifact}; an artifact is written by build alone "
                         "(a file added or replaced there breaks its hashes): give a path outside it")
