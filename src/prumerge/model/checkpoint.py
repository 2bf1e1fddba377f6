"""Read just the vision side of a checkpoint: a local directory or a Hugging Face hub id.

A LLaVA-1.5-7B checkpoint is ~14 GB, of which the vision tower and projector are ~0.6 GB; loading
``LlavaForConditionalGeneration`` to get at them would read the whole LLM. Instead the safetensors index is used
to open only the shards holding vision/projector tensors, and only those tensors are read. Key layouts of
transformers 4.x (``vision_tower.vision_model.*``), 5.x (``vision_tower.*`` / ``model.vision_tower.*``) and
plain CLIP checkpoints (``vision_model.*``) are all accepted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError

_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


@dataclasses.dataclass
class Checkpoint:
    """Where a checkpoint lives and how to fetch its files (lazily, one by one, for hub ids)."""

    source: str
    root: Path | None  # local directory, or None for a hub id
    revision: str | None = None

    @classmethod
    def open(cls, path_or_id: str | os.PathLike, revision: str | None = None) -> "Checkpoint":
        path = Path(path_or_id).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{path} has no config.json; is it a saved Hugging Face checkpoint?")
            return cls(source=str(path_or_id), root=path.resolve(), revision=revision)
        text = str(path_or_id)
        if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
            raise CheckpointError(f"{text!r} is neither a checkpoint directory nor a hub id like 'org/name'")
        return cls(source=text, root=None, revision=revision)

    def file(self, name: str, required: bool = True) -> Path | None:
        """Local path of ``name``, downloading just that file for hub ids."""
        if self.root is not None:
            candidate = self.root / name
            if candidate.is_file():
                return candidate
            if required:
                raise CheckpointError(f"{self.source}: missing file {name}")
            return None
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        except ImportError as exc:  # pragma: no cover - transformers always brings huggingface_hub
            raise CheckpointError("huggingface_hub is needed to read hub checkpoints") from exc
        try:
            return Path(hf_hub_download(self.source, name, revision=self.revision))
        except LocalEntryNotFoundError:  # the hub could not be reached (or offline mode) and the cache lacks it
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
            raise CheckpointError(
                f"{self.source}: {name} is not in the hub cache and the hub "
                + ("is switched off (HF_HUB_OFFLINE is set)" if offline else "cannot be reached (no network?)")
                + ": give a local checkpoint directory, or download it once where there is network (it lands in the "
                "hub cache, and HF_HUB_OFFLINE=1 then reads it from there)") from None
        except EntryNotFoundError:
            if required:
                raise CheckpointError(f"{self.source}: the hub repository has no file {name}") from None
            return None
        except Exception as exc:  # network, auth, unknown repo: one message naming the repo
            if not required and "404" in str(exc):
                return None
            raise CheckpointError(f"could not fetch {name} from hub repository {self.source}: {exc}") from exc

    def config(self) -> dict:
        path = self.file("config.json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.source}: config.json is not valid JSON ({exc})") from exc

    def config_dir(self) -> Path:
        """Directory holding config.json (and preprocessor_config.json when present), for transformers loaders."""
        path = self.file("config.json")
        self.file("preprocessor_config.json", required=False)
        return path.parent

    def processor(self) -> dict | None:
        """The checkpoint's ``preprocessor_config.json`` as a dict, or None when it has none."""
        path = self.file("preprocessor_config.json", required=False)
        if path is None:
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.source}: preprocessor_config.json is not valid JSON ({exc})") from exc

    def fingerprint(self) -> str:
        """sha256 over config.json and the weight index: identifies the checkpoint a build came from."""
        digest = hashlib.sha256()
        for name in ("config.json", "model.safetensors.index.json"):
            path = self.file(name, required=False)
            if path is not None:
                digest.update(path.read_bytes())
        return digest.hexdigest()

    def weight_files(self, safetensors_only: bool = False) -> list:
        """The checkpoint's weight file names, in order: sharded or single safetensors, else (unless
        ``safetensors_only``) sharded or single ``pytorch_model.bin``; [] when there are none."""
        kinds = [("model.safetensors.index.json", "model.safetensors")]
        if not safetensors_only:
            kinds.append(("pytorch_model.bin.index.json", "pytorch_model.bin"))
        for index_name, single in kinds:
            index = self.file(index_name, required=False)
            if index is not None:
                return sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if self.file(single, required=False) is not None:
                return [single]
        return []

    def read_tensors(self, wanted: Callable[[str], bool]) -> dict:
        """Tensors whose key satisfies ``wanted``, read from only the weight files that hold them."""
        import torch

        index = self.file("model.safetensors.index.json", required=False)
        if index is not None:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if wanted(key)})
            return _read_safetensors([self.file(s) for s in shards], wanted)
        single = self.file("model.safetensors", required=False)
        if single is not None:
            return _read_safetensors([single], wanted)
        for name in ("pytorch_model.bin.index.json",):
            bin_index = self.file(name, required=False)
            if bin_index is not None:
                weight_map = json.loads(bin_index.read_text())["weight_map"]
                shards = sorted({shard for key, shard in weight_map.items() if wanted(key)})
                out = {}
                for shard in shards:
                    out.update({k: v for k, v in _torch_load(self.file(shard), torch).items() if wanted(k)})
                return out
        binary = self.file("pytorch_model.bin", required=False)
        if binary is not None:
            return {k: v for k, v in _torch_load(binary, torch).items() if wanted(k)}
        raise CheckpointError(f"{self.source}: no model.safetensors, sharded safetensors or pytorch_model.bin found")


def _read_safetensors(paths, wanted) -> dict:
    from safetensors import safe_open

    out = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if wanted(key):
                        out[key] = handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"cannot read weights from {path}: {exc}") from exc
    return out


def _torch_load(path, torch):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:
        raise CheckpointError(f"cannot read weights from {path} (weights_only load): {exc}") from exc


def strip_prefix(state: dict, prefixes: tuple[str, ...]) -> dict:
    """Keys under the first of ``prefixes`` that occurs, with the prefix removed."""
    for prefix in prefixes:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


def vision_state(state: dict, has_prefix: bool) -> dict:
    """Normalise vision-tower keys to transformers 5.x ``CLIPVisionModel`` names (``embeddings.*``, ``encoder.*``)."""
    if has_prefix:
        state = strip_prefix(state, _VISION_PREFIXES)
    if any(k.startswith("vision_model.") for k in state):
        state = {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
    return state


def is_vision_key(key: str) -> bool:
    return key.startswith(_VISION_PREFIXES) or key.startswith("vision_model.")


def is_projector_key(key: str) -> bool:
    return key.startswith(_PROJECTOR_PREFIXES)


def projector_state(state: dict) -> dict:
    return strip_prefix(state, _PROJECTOR_PREFIXES)
