"""Original LLaVA layout (and the released PruMerge / PruMerge+ LoRA checkpoints) -> a llava-hf checkpoint.

The released PruMerge checkpoints are in the layout of the original LLaVA code, not transformers':

* ``config.json``: a LLaMA config plus ``mm_vision_tower`` (the CLIP tower, a hub id or a directory),
  ``mm_projector_type: mlp2x_gelu``, ``mm_vision_select_layer``, ``mm_vision_select_feature``, ``image_aspect_ratio``;
* merged checkpoints: the LLM as ``model.*`` / ``lm_head.*`` and the projector as ``model.mm_projector.{0,2}.*``;
* LoRA checkpoints: a PEFT ``adapter_config.json`` + ``adapter_model.safetensors|bin`` over a base LLM (Vicuna-7B
  v1.5 for PruMerge), and ``non_lora_trainables.bin`` holding the projector under
  ``base_model.model.model.mm_projector.*`` (prefixes stripped as the official loader strips them).

:func:`convert_llava_original` writes what transformers' ``LlavaForConditionalGeneration`` loads: keys renamed as
transformers' own LLaVA conversion renames them (5.x names), each LoRA target merged as ``W + s * B @ A`` (``s =
alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA), the projector from the non-LoRA file, the tower's weights and
config from ``mm_vision_tower`` (or ``vision_tower=``), an ``<image>`` token added to the tokenizer and the
embedding rows padded to a multiple of 64 (new rows = the mean row), and the tower's processor config (padding to
square when ``image_aspect_ratio`` is ``pad``, as LLaVA-1.5 does). Tensors stream shard by shard, so a 7B model
is never instantiated. ``.bin`` files are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..model.checkpoint import Checkpoint, vision_state
from ..errors import CheckpointError

SHARD_BYTES = 2 << 30
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
PAD_MULTIPLE = 64
_FEATURE_STRATEGY = {"patch": "default", "cls_patch": "full"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "added_tokens.json", "chat_template.jinja", "generation_config.json")


def is_llava_original(path) -> bool:
    """A local directory in the original LLaVA layout (``mm_vision_tower`` in a config without ``vision_config``)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "mm_vision_tower" in data and "vision_config" not in data


def _tower_location(source: Path, value) -> str:
    """Where ``mm_vision_tower`` points: an absolute path; a path relative to the *checkpoint directory* (never the
    working directory, which would load whatever happens to be there); else a hub id."""
    if not isinstance(value, str) or not value.strip():
        raise CheckpointError(f"{source}: mm_vision_tower must be a hub id or a path, got {value!r}")
    if os.path.isabs(value):
        return value
    local = Path(source) / value
    if value.startswith(("./", "../")) or value in (".", "..") or local.exists():
        return str(local.resolve())
    if Path(value).exists():
        raise CheckpointError(f"{source}: mm_vision_tower {value!r} is not inside the checkpoint directory; a directory "
                              "of that name in the working directory is not used: pass --vision-tower DIR")
    return value  # a hub id


def convert_llava_original(source, out, base=None, vision_tower=None, progress: Callable[[str], None] | None = None,
                           vision_only: bool = False) -> dict:
    """Write ``source`` (original LLaVA layout, merged or LoRA) as a llava-hf checkpoint in ``out``; return facts.

    ``vision_only``: the vision tower and projector alone (config and processor as for the whole model, no language
    model weights, no tokenizer, no LoRA merge): what ``verify`` rebuilds its PyTorch reference from, without
    writing a 7B language model to disk to read its vision side back."""
    step = progress or (lambda message: None)
    source = Path(source)
    if not is_llava_original(source):
        raise CheckpointError(f"{source} is not an original-layout LLaVA checkpoint (config.json without mm_vision_tower)")
    config = json.loads((source / "config.json").read_text())
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type != "mlp2x_gelu":
        raise CheckpointError(f"{source}: mm_projector_type {projector_type!r} is not supported (llava-hf's projector is mlp2x_gelu)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in _FEATURE_STRATEGY:
        raise CheckpointError(f"{source}: mm_vision_select_feature {feature!r} is not supported (patch or cls_patch)")
    lora = (source / "adapter_config.json").is_file()
    if lora:
        base = base or _local_base(source)
        if base is None:
            raise CheckpointError(f"{source} is a LoRA checkpoint: pass --base with its base LLM (e.g. lmsys/vicuna-7b-v1.5)")
        llm = Checkpoint.open(base)
    else:
        llm = Checkpoint.open(source)
    tower_source = vision_tower or _tower_location(source, config["mm_vision_tower"])
    try:
        tower = Checkpoint.open(tower_source)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: cannot open the vision tower {tower_source!r} ({exc}); pass --vision-tower DIR") from exc

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step(f"reading the vision tower {tower_source}")
    vision_config = _vision_config(tower)
    extra = _non_lora_trainables(source) if lora else {}
    text_config = _text_config(llm)
    writer = _ShardWriter(out)
    if vision_only:
        step("reading the projector (vision side only: no language model is written)")
        is_projector = lambda key: key.startswith("model.mm_projector.")  # noqa: E731
        projector = {k: v for k, v in extra.items() if is_projector(k)} if lora else llm.read_tensors(is_projector)
        image_token_id, padded_vocab, merged = None, text_config["vocab_size"], set()
    else:
        image_token_id, padded_vocab, projector, merged = _write_language_model(source, llm, extra, lora, base,
                                                                                text_config, writer, step)
    for index, name in ((0, "linear_1"), (2, "linear_2")):
        for part in ("weight", "bias"):
            key = f"model.mm_projector.{index}.{part}"
            if key not in projector:
                raise CheckpointError(f"{source}: projector weight {key} not found"
                                      + (" in non_lora_trainables.bin" if lora else ""))
            writer.add(f"model.multi_modal_projector.{name}.{part}", projector[key])
    step("copying the vision tower weights")
    clip_model = json.loads(tower.file("config.json").read_text()).get("model_type") == "clip"  # else a CLIP vision model
    tower_state = vision_state(tower.read_tensors(lambda k: k.startswith("vision_model.") or not clip_model), has_prefix=False)
    if not tower_state:
        raise CheckpointError(f"{tower_source}: no vision-tower weights found")
    for key, tensor in tower_state.items():
        writer.add(f"model.vision_tower.{key}", tensor)
    writer.close()

    text_config["vocab_size"] = padded_vocab
    text_config["pad_token_id"] = text_config.get("pad_token_id")
    hf_config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision_config,
        "text_config": text_config,
        "image_token_id": image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": int(config.get("mm_vision_select_layer", -2)),
        "vision_feature_select_strategy": _FEATURE_STRATEGY[feature],
        "tie_word_embeddings": bool(text_config.get("tie_word_embeddings", False)),
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=1, default=str))
    _write_processor(tower, out, pad=config.get("image_aspect_ratio") == "pad")
    return {"layout": "llava-original", "lora": lora, "base": str(base) if lora else None,
            "vision_tower": str(tower_source), "lora_targets": len(merged), "image_token_id": image_token_id}


def _write_language_model(source: Path, llm: Checkpoint, extra: dict, lora: bool, base, text_config: dict, writer,
                          step) -> tuple[int, int, dict, set]:
    """The tokenizer (with ``<image>``) and every language-model tensor (LoRA merged), into ``writer``. Returns (image
    token id, padded vocabulary, the projector's tensors met on the way, the LoRA-merged keys)."""
    deltas = _lora_deltas(source) if lora else {}
    merged, projector = set(), {}
    step("writing the llava-hf checkpoint" + (f" (LoRA merged into {base})" if lora else ""))
    tokenizer_dir = source if (source / "tokenizer.json").is_file() or (source / "tokenizer.model").is_file() else None
    if tokenizer_dir is None and llm.root is not None:
        tokenizer_dir = llm.root
    image_token_id, vocab = _write_tokenizer(llm if tokenizer_dir is None else Checkpoint.open(tokenizer_dir), writer.out)
    padded_vocab = _padded(max(vocab, text_config["vocab_size"]))
    for key, tensor in _tensors(llm, extra):
        if key.startswith("model.mm_projector."):
            projector[key] = tensor
            continue
        if key.startswith(("model.vision_tower.", "model.vision_resampler.")):
            continue
        if key in deltas:
            tensor = (tensor.float() + deltas[key]).to(tensor.dtype)
            merged.add(key)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = _pad_rows(tensor, padded_vocab)
        writer.add(_hf_key(key), tensor)
    missing = sorted(set(deltas) - merged)
    if missing:
        raise CheckpointError(f"{source}: LoRA targets not found in the base weights: {', '.join(missing[:5])}")
    return image_token_id, padded_vocab, projector, merged


@contextmanager
def as_llava_hf(model: str, base=None, vision_tower=None, target=None, progress=None,
                vision_only: bool = False) -> Iterator[tuple[str, dict]]:
    """``(checkpoint to load, source facts)``: ``model`` itself when it is not in the original layout, else a
    llava-hf conversion in a temporary directory (beside the build's ``target`` when given, named so that a
    later build removes it if this process is killed; removed afterwards). ``vision_only``: see
    :func:`convert_llava_original`."""
    from .staging import scratch_directory

    if not is_llava_original(model):
        if base or vision_tower:
            raise CheckpointError(f"--base / --vision-tower apply to original-layout LLaVA checkpoints; {model} is not one")
        yield model, {}
        return
    directory = scratch_directory(Path(target), "convert") if target else Path(tempfile.mkdtemp(prefix="prumerge-convert-"))
    try:
        facts = convert_llava_original(model, directory, base=base, vision_tower=vision_tower, progress=progress,
                                       vision_only=vision_only)
        yield str(directory), facts
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ pieces
def _local_base(source: Path):
    """The adapter's own ``base_model_name_or_path`` when that is a local directory (else the user must say)."""
    named = json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return named if named and Path(named).is_dir() else None


def _hf_key(key: str) -> str:
    """Original LLaVA / LLaMA key -> llava-hf (transformers 5.x) key, as transformers' LLaVA conversion renames."""
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key  # lm_head.*


def _padded(vocab: int) -> int:
    return int(math.ceil(vocab / PAD_MULTIPLE) * PAD_MULTIPLE)


def _pad_rows(tensor, rows: int):
    import torch

    if tensor.shape[0] >= rows:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)], dim=0).contiguous()


def _load_bin(path: Path) -> dict:
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as plain tensors (weights_only load refused it: {exc})") from exc


def _non_lora_trainables(source: Path) -> dict:
    """``non_lora_trainables.bin`` with prefixes stripped as LLaVA's loader strips them (``base_model.``, then
    ``model.`` where ``model.model.`` keys remain)."""
    path = source / "non_lora_trainables.bin"
    if not path.is_file():
        raise CheckpointError(f"{source}: LoRA checkpoint without non_lora_trainables.bin (it holds the projector)")
    state = {(k[len("base_model."):] if k.startswith("base_model.") else k): v for k, v in _load_bin(path).items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def _lora_deltas(source: Path) -> dict:
    """``{base weight key: s * B @ A}`` (fp32) for every LoRA pair of the adapter."""
    import torch

    adapter = json.loads((source / "adapter_config.json").read_text())
    if adapter.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{source}: adapter type {adapter.get('peft_type')!r} is not supported (LoRA only)")
    rank, alpha = int(adapter["r"]), float(adapter.get("lora_alpha", adapter["r"]))
    scale = alpha / math.sqrt(rank) if adapter.get("use_rslora") else alpha / rank
    if (source / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(source / "adapter_model.safetensors"))
    elif (source / "adapter_model.bin").is_file():
        weights = _load_bin(source / "adapter_model.bin")
    else:
        raise CheckpointError(f"{source}: adapter_config.json without adapter_model.safetensors or adapter_model.bin")
    pairs: dict = {}
    for key, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0]
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise CheckpointError(f"{source}: adapter tensor {key} is not a LoRA A/B weight (modules_to_save is not supported)")
    deltas = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{source}: LoRA module {module} lacks its A or B weight")
        delta = scale * (pair["lora_B"].float() @ pair["lora_A"].float())
        if adapter.get("fan_in_fan_out"):
            delta = delta.T
        target = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
        deltas[target + ".weight"] = delta
    return deltas


def _tensors(llm: Checkpoint, overrides: dict) -> Iterator:
    """Every LLM tensor, one weight file at a time; ``overrides`` (non-LoRA trainables) replace or add keys."""
    import torch  # noqa: F401  (torch tensors throughout)

    files = llm.weight_files()
    if not files:
        raise CheckpointError(f"{llm.source}: no model.safetensors, sharded safetensors or pytorch_model.bin found")
    seen = set()
    for name in files:
        path = llm.file(name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    seen.add(key)
                    yield key, overrides.get(key, handle.get_tensor(key))
        else:
            for key, tensor in _load_bin(path).items():
                seen.add(key)
                yield key, overrides.get(key, tensor)
    for key in sorted(set(overrides) - seen):
        yield key, overrides[key]


class _ShardWriter:
    """safetensors shards of at most ``SHARD_BYTES`` plus the index transformers reads."""

    def __init__(self, out: Path) -> None:
        self.out, self.buffer, self.size, self.weight_map, self.count = out, {}, 0, {}, 0

    def add(self, key: str, tensor) -> None:
        if key in self.weight_map or key in self.buffer:
            raise CheckpointError(f"duplicate weight {key} while converting")
        self.buffer[key] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        self.count += 1
        name = f"model-{self.count:05d}.safetensors"
        save_file(self.buffer, str(self.out / name), metadata={"format": "pt"})
        self.weight_map.update({k: name for k in self.buffer})
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _text_config(llm: Checkpoint) -> dict:
    """The LLM's config (the base's for LoRA checkpoints), without the original layout's mm_* fields."""
    text = dict(json.loads(llm.file("config.json").read_text()))
    text = {k: v for k, v in text.items() if not k.startswith(("mm_", "tune_mm", "freeze_mm", "image_", "use_mm"))}
    text["model_type"] = "llama" if text.get("model_type") in (None, "llava", "llava_llama") else text["model_type"]
    text["architectures"] = ["LlamaForCausalLM"] if text["model_type"] == "llama" else text.get("architectures")
    return text


def _vision_config(tower: Checkpoint) -> dict:
    data = json.loads(tower.file("config.json").read_text())
    if data.get("model_type") == "clip":
        data = data.get("vision_config") or {}
        data["model_type"] = "clip_vision_model"
    if data.get("model_type") != "clip_vision_model":
        raise CheckpointError(f"{tower.source}: the vision tower must be a CLIP (or CLIP vision) checkpoint, got {data.get('model_type')!r}")
    return {k: v for k, v in data.items() if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}


def _write_tokenizer(source: Checkpoint, out: Path) -> tuple[int, int]:
    """Copy the tokenizer and add ``<image>`` (and ``<pad>`` when it has no pad token) as transformers' conversion
    does; return (image token id, vocabulary size)."""
    from transformers import AutoTokenizer

    if source.root is None:
        directory = source.config_dir()
        for name in _TOKENIZER_FILES:
            source.file(name, required=False)
    else:
        directory = source.root
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise CheckpointError(f"{source.source}: cannot load its tokenizer ({exc})") from exc
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.save_pretrained(str(out))
    for name in ("generation_config.json",):
        path = source.file(name, required=False)
        if path is not None:
            shutil.copyfile(path, out / name)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)), len(tokenizer)


def _write_processor(tower: Checkpoint, out: Path, pad: bool) -> None:
    processor = tower.processor()
    if processor is None:
        return
    processor = dict(processor)
    if pad:  # LLaVA-1.5 pads to square with the mean colour before the CLIP processor (image_aspect_ratio=pad)
        processor["do_pad"] = True
        processor["image_processor_type"] = "LlavaImageProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
