"""The language model of a LLaVA checkpoint -> an ONNX decoder that takes ``inputs_embeds`` (int4 by default).

The maintained tool does the conversion: onnxruntime-genai's model builder (``exclude_embeds=true`` so visual tokens
can be fed as embeddings; MatMulNBits int4 weight-only quantisation; KV cache; GroupQueryAttention). prumerge only
prepares its input (the LLM half of the checkpoint as a plain causal-LM directory, written shard by shard by
renaming keys, so a 7B model is never instantiated) and records what the runtime needs: the embedding table, the
tokenizer, the prompt format, the decoder's I/O names and cache geometry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from ..artifact.manifest import DecoderIO
from ..model.checkpoint import Checkpoint
from ..errors import CheckpointError, ConfigError, ExportError

from .options import LLM_PRECISIONS as PRECISIONS  # noqa: E402  (declared with the build's options)
LLM_DIR = "llm"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json")
PROMPT_SLOT = "{prompt}"
# int4: k-quant with the LM head kept at int8. Measured on SmolLM2-135M (teacher-forced top-1 agreement with fp32,
# 6 prompts): plain RTN int4 0.68, this 0.75, int8 0.95 - at the same CPU decode speed.
BUILDER_OPTIONS = {"int4": {"algo_config": "k_quant_last"}}
# every precision: the LM head runs on the last position only (the builder's Gather before it). A prefill of 589
# positions otherwise computes 589 rows of logits over SmolLM2's 49152 words (~33 GFLOP) to use one of them.
COMMON_BUILDER_OPTIONS = {"prune_lm_head": "true"}
LLAVA15_FORMAT = "USER: {prompt} ASSISTANT:"
_SENTINEL = "\u2063PRUMERGE_PROMPT\u2063"


def _lm_key(key: str) -> str | None:
    """Checkpoint key -> causal-LM key, for every LLaVA key layout (legacy ``language_model.model.*`` and 5.x
    ``model.language_model.*``); None for vision/projector keys."""
    if key.startswith("language_model."):
        return key[len("language_model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("lm_head."):
        return key
    return None


def require_safetensors(checkpoint: Checkpoint) -> None:
    """Checked before any export work: the LLM conversion reads safetensors only."""
    if not checkpoint.weight_files(safetensors_only=True):
        raise CheckpointError(f"{checkpoint.source}: the LLM export needs safetensors weights (this checkpoint has only "
                              "pytorch_model.bin); convert them with transformers' save_pretrained, or pass --no-llm")


def extract_language_model(checkpoint: Checkpoint, text_config, out: Path) -> Path:
    """Write the LLM half of ``checkpoint`` as a causal-LM directory (config, safetensors shards, tokenizer)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shards = checkpoint.weight_files(safetensors_only=True)
    if not shards:
        raise CheckpointError(f"{checkpoint.source}: the LLM export needs safetensors weights")
    weight_map, found = {}, 0
    for number, shard in enumerate(shards):
        tensors = {}
        with safe_open(str(checkpoint.file(shard)), framework="pt") as handle:
            for key in handle.keys():
                target = _lm_key(key)
                if target is not None:
                    tensors[target] = handle.get_tensor(key).contiguous()
        if tensors:
            name = f"model-{number:05d}.safetensors"
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
            found += len(tensors)
        del tensors
    if not any(k.startswith("model.embed_tokens") for k in weight_map):
        raise CheckpointError(f"{checkpoint.source}: no language-model weights found (expected language_model.* keys)")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = text_config.to_dict()
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM"}.get(config.get("model_type"))
    if arch is None:
        raise ConfigError(f"language model type {config.get('model_type')!r} is not supported by the LLM export yet")
    config["architectures"] = [arch]
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    for name in TOKENIZER_FILES:
        path = checkpoint.file(name, required=False)
        if path is not None:
            shutil.copyfile(path, out / name)
    if not (out / "tokenizer.json").is_file():
        raise CheckpointError(f"{checkpoint.source}: no tokenizer.json; the runtime's tokenizer needs the fast-tokenizer file")
    return out


def run_model_builder(hf_dir: Path, out: Path, precision: str, provider: str, cache_dir: Path,
                      extra_options: dict | None = None) -> None:
    """onnxruntime-genai's model builder as a subprocess (its CLI is its stable interface)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown LLM precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise ExportError("the LLM export needs onnxruntime-genai (pip install onnxruntime-genai), or pass --no-llm") from exc
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-p", precision,
           "-e", provider, "-c", str(cache_dir), "--extra_options", "exclude_embeds=true",
           *[f"{k}={v}" for k, v in (extra_options or {}).items()]]
    # its own process group, and (Linux) killed with us: a SIGKILLed build leaves no orphan converting a 7B model
    result = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True, preexec_fn=_die_with_parent)
    if result.returncode != 0 or not (out / "model.onnx").is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ExportError(f"onnxruntime-genai model builder failed ({precision}, {provider}):\n{tail}")


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the process group still lets a supervisor stop it
        pass


# a chat template is code from the checkpoint: it is rendered in a child process with a time and size bound (a
# template with nested range(100000) loops hung the build for minutes)
TEMPLATE_TIMEOUT_S = 60.0
TEMPLATE_MAX_CHARS = 1_000_000
_RENDER = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
out = {"template": bool(tokenizer.chat_template), "rendered": None}
if tokenizer.chat_template:
    try:
        out["rendered"] = tokenizer.apply_chat_template([{"role": "user", "content": sys.argv[2]}],
                                                        add_generation_prompt=True, tokenize=False)
    except Exception:  # templates that need structured content: the caller falls back to LLaVA-1.5's format
        pass
    if isinstance(out["rendered"], str) and len(out["rendered"]) > int(sys.argv[3]):
        out = {"template": True, "too_long": len(out["rendered"])}
sys.stdout.write(json.dumps(out))
"""


def render_chat_template(hf_dir: Path) -> str | None:
    """The checkpoint's chat template rendered for one user turn holding a sentinel (None: no usable template),
    in a child process bounded by :data:`TEMPLATE_TIMEOUT_S` and :data:`TEMPLATE_MAX_CHARS`."""
    try:
        result = subprocess.run([sys.executable, "-c", _RENDER, str(hf_dir), _SENTINEL, str(TEMPLATE_MAX_CHARS)],
                                capture_output=True, text=True, timeout=TEMPLATE_TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise CheckpointError(f"{hf_dir}: the chat template did not render within {TEMPLATE_TIMEOUT_S:g} s (a template is "
                              "code from the checkpoint; this one loops too long); fix tokenizer_config.json's chat_template") from None
    try:
        data = json.loads(result.stdout)
    except ValueError:
        tail = (result.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise CheckpointError(f"{hf_dir}: cannot read the tokenizer to render its chat template ({tail[0]})") from None
    if "too_long" in data:
        raise CheckpointError(f"{hf_dir}: the chat template renders {data['too_long']} characters for one short turn "
                              f"(over {TEMPLATE_MAX_CHARS}); fix tokenizer_config.json's chat_template")
    return data.get("rendered")


# (chat template, special tokens) -> its rendering: what the template sees is exactly these, so a process that builds
# several artifacts of one checkpoint (PruMerge and PruMerge+, fp32 and INT8) starts the child (~4 s) once
_RENDERED: dict = {}


def prompt_format(hf_dir: Path) -> tuple[str, bool]:
    """(format with ``{prompt}``, whether the runtime must prepend BOS), from the checkpoint's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    fmt = rendered = None
    if tokenizer.chat_template:
        key = json.dumps([tokenizer.chat_template, tokenizer.special_tokens_map], sort_keys=True, default=str)
        if key not in _RENDERED:
            _RENDERED[key] = render_chat_template(hf_dir)
        rendered = _RENDERED[key]
    if isinstance(rendered, str) and rendered.count(_SENTINEL) == 1:
        fmt = rendered.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, PROMPT_SLOT)
    fmt = fmt or LLAVA15_FORMAT
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id
    starts_with_bos = tokenizer.bos_token is not None and fmt.startswith(tokenizer.bos_token)
    return fmt, bool(adds_bos and not starts_with_bos)


def build_llm(source: str, revision: str | None, config, stage: Path, precision: str, provider: str,
              kv_visual: list | None = None, kv_images: dict | None = None, kv_prefill: str = "int8") -> dict:
    """Build ``stage/llm/`` and return the manifest's ``llm`` section (measured from the built decoder).

    ``kv_visual`` (a list, possibly empty): the decoder keeps an int8 KV cache calibrated on prompts holding these
    visual tokens (one image's each; text alone when empty), see :mod:`prumerge.export.kv_cache`; ``kv_images``
    says where they came from; ``kv_prefill`` "float": the first step's attention in float (a mixed cache). None: the
    builder's float cache."""
    import numpy as np
    import onnx
    from safetensors import safe_open

    checkpoint = Checkpoint.open(source, revision=revision)
    work = stage / ".llm-work"
    hf_dir = extract_language_model(checkpoint, config.text_config, work / "hf")
    out = stage / LLM_DIR
    run_model_builder(hf_dir, out, precision, provider, work / "cache",
                      COMMON_BUILDER_OPTIONS | BUILDER_OPTIONS.get(precision, {}))

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(hf_dir / index["model.embed_tokens.weight"]), framework="np") as handle:
        table = handle.get_tensor("model.embed_tokens.weight")
    np.save(out / "embeddings.npy", table.astype(np.float16 if precision in ("int4", "int8", "fp16") else np.float32))
    fmt, add_bos = prompt_format(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (hf_dir / name).is_file() and not (out / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
    genai_config = json.loads((out / "genai_config.json").read_text())
    genai = genai_config["model"]
    decoder = onnx.load(str(out / genai["decoder"]["filename"]), load_external_data=False).graph
    inputs = {i.name: i for i in decoder.input}
    logits_dims = next(o for o in decoder.output if o.name == "logits").type.tensor_type.shape.dim
    eos = genai.get("eos_token_id")
    shutil.rmtree(work)
    section = {
        "directory": LLM_DIR,
        "builder": "onnxruntime-genai",
        "precision": precision,
        "provider": provider,
        "model_type": config.text_config.model_type,
        "decoder": genai["decoder"]["filename"],
        "embeddings": "embeddings.npy",
        "tokenizer": "tokenizer.json",
        "hidden_size": genai["decoder"]["hidden_size"],
        "vocab_size": genai["vocab_size"],
        "num_layers": genai["decoder"]["num_hidden_layers"],
        "num_kv_heads": genai["decoder"]["num_key_value_heads"],
        "head_size": genai["decoder"]["head_size"],
        "context_length": genai["context_length"],
        "io": DecoderIO.from_templates(genai["decoder"]["inputs"] | genai["decoder"]["outputs"],
                                       genai["decoder"]["num_hidden_layers"]),
        "has_position_ids": "position_ids" in inputs,
        "kv_dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inputs["past_key_values.0.key"].type.tensor_type.elem_type)).name,
        "embeds_dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inputs["inputs_embeds"].type.tensor_type.elem_type)).name,
        "bos_token_id": genai.get("bos_token_id"),
        "eos_token_ids": eos if isinstance(eos, list) else [eos],
        "add_bos": add_bos,
        "prompt_format": fmt,
        "image_marker": "<image>",
        "image_token_id": getattr(config, "image_token_id", getattr(config, "image_token_index", None)),
        # GroupQueryAttention decoders can write the new keys/values into one preallocated buffer in place
        "kv_share_buffer": bool(genai_config.get("search", {}).get("past_present_share_buffer")),
        # "last": the logits output is [batch, 1, vocab] whatever the step's length (prune_lm_head)
        "logits": "last" if len(logits_dims) == 3 and logits_dims[1].dim_value == 1 else "all",
    }
    if kv_visual is not None:
        from .kv_cache import int8_kv_cache

        section["kv_cache"] = int8_kv_cache(stage, section, kv_visual, kv_images or {}, prefill=kv_prefill)
        section["kv_dtype"] = "int8"
    return section
