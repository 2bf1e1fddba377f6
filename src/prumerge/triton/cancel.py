"""Cancelling a decode that the entry model started: a flag file per request, shared by the Triton models' processes.

Why a file: a client that leaves the entry model ``prumerge`` cancels *that* request, but the decode it asked of
``prumerge_llm`` is a separate BLS request, and the Python backend shipped with Triton 2.4x (nvidia-pytriton 0.7)
has no way to cancel a BLS request (its response iterator has no ``cancel()``). Each Python model runs in its own
stub process, so the two models share nothing in memory. The entry model therefore gives each decode a random key
(the ``CANCEL_KEY`` input); when its client goes away it raises the key's flag, and the LLM model looks for the flag
between tokens (one ``stat``, microseconds, beside milliseconds of decode) and stops.

The board is a private directory (mode 0700, owned by this user, never a link) in the temp directory, named after
the model repository so servers of different repositories do not share one. Keys are 128-bit random hex and are
checked as such before they touch a path: a client-supplied key can neither name a file outside the board nor guess
another request's key.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

_KEY = re.compile(r"[0-9a-f]{32}")


class CancelBoard:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
        except FileExistsError:  # a file (or a dangling link) where the board should be
            pass
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise PermissionError(f"{self.directory} is not a private directory of this user: refusing it as the "
                                  "cancel board")

    @classmethod
    def for_repository(cls, model_dir: str | Path) -> "CancelBoard":
        """The board of the repository holding ``model_dir`` (``.../models/NAME``, what Triton passes a model)."""
        models = Path(model_dir).resolve().parent
        digest = hashlib.sha256(str(models).encode()).hexdigest()[:16]
        return cls(Path(tempfile.gettempdir()) / f"prumerge-cancel-{os.getuid()}-{digest}")

    @staticmethod
    def new_key() -> str:
        return secrets.token_hex(16)

    def _flag(self, key: str) -> Path | None:
        return self.directory / key if isinstance(key, str) and _KEY.fullmatch(key) else None

    def cancel(self, key: str) -> None:
        """Raise ``key``'s flag (the decode stops at its next token)."""
        flag = self._flag(key)
        if flag is not None:
            flag.touch()

    def cancelled(self, key: str | None) -> bool:
        flag = self._flag(key) if key else None
        return flag is not None and flag.exists()

    def clear(self, key: str) -> None:
        """Lower the flag once the decode has ended (the entry model does, so none is left behind)."""
        flag = self._flag(key)
        if flag is not None:
            flag.unlink(missing_ok=True)
