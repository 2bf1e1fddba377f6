"""Tiny models built from configs and saved to disk, so tests load them through the same path as a user's checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Several pytest-xdist workers share the cores: each worker's torch / OpenMP (and the builder subprocesses it starts,
# which inherit the environment) takes its share instead of every core. Set before anything imports torch; measured:
# two workers each spinning two OpenMP threads on 2 cores made the torch-heavy tests 3-4x slower than alone.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# The test files that take longest (seconds of one worker, measured on 2 idle cores), started first: the workers
# take whole files (--dist loadfile) in collection order, so a long file collected last leaves the other worker idle
# at the end. Only the order changes; a file not listed keeps its place after these.
LONGEST_FILES = {"test_realweights.py": 173, "test_smollm2.py": 141, "test_bad_input.py": 108, "test_demovlm.py": 96,
                 "test_cdpruner.py": 95, "test_export.py": 85, "test_triton.py": 70, "test_pipeline.py": 70,
                 "test_visionzip_divprune.py": 48, "test_serve.py": 46, "test_profile.py": 44,
                 "test_hostile_outputs.py": 25, "test_hostile_manifests.py": 21}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -LONGEST_FILES.get(item.path.name, 0))  # stable: file order kept within each file


TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=112, patch_size=14
)


def tiny_vision_config(**overrides):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**TINY_VISION, **overrides})


TINY_VOCAB = 320
CORPUS = [
    "a photo of a cat on a mat", "what is in this picture", "describe the image in detail", "the quick brown fox",
    "jumps over the lazy dog", "USER: ASSISTANT:", "there are two birds and a tree", "red green blue yellow",
] * 20


def tiny_tokenizer():
    """A byte-level BPE trained here on a few sentences, with a LLaVA-1.5 style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    return fast


def tiny_llava(seed=0, **vision_overrides):
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=TINY_VOCAB, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(vision_config=tiny_vision_config(**vision_overrides), text_config=text, image_token_id=TINY_VOCAB - 1)
    return LlavaForConditionalGeneration(config).eval()


def shared(tmp_path_factory, name: str, make) -> Path:
    """``make(path)``'s directory, made once per test run for every xdist worker: a session fixture runs once per
    worker, so each worker built its own copy of every checkpoint and artifact its files asked for. The first worker
    to ask makes it (into a scratch name, renamed when complete) under a lock; the others wait, then read it."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    path = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            scratch = root / f".{name}.making"
            shutil.rmtree(scratch, ignore_errors=True)
            make(scratch)
            scratch.rename(path)
    return path


def _save_clip(path):
    import torch
    from transformers import CLIPVisionModel

    torch.manual_seed(1)
    CLIPVisionModel(tiny_vision_config()).eval().save_pretrained(path)


def _save_llava(path):
    tiny_llava().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return shared(tmp_path_factory, "clip", _save_clip)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    return shared(tmp_path_factory, "llava", _save_llava)


def tiny_clip_tokenizer():
    """A byte-level BPE with CLIP's start/end tokens added by its post-processor (as CLIP's tokenizer.json does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["!", "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>"), bos, eos


def _save_llava_clip(path, llava_dir):
    """The full CLIP the tiny LLaVA's tower was "taken from": its vision model is the tower (weights equal), with a
    text model, both projections and a CLIP tokenizer (16 positions, so a question spans several segments)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, LlavaForConditionalGeneration

    tokenizer, bos, eos = tiny_clip_tokenizer()
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos,
                          pad_token_id=0, projection_dim=24)
    vision = llava.config.vision_config.to_dict() | {"projection_dim": 24}  # as a real CLIP's sub-configs say it
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=24)
    torch.manual_seed(3)
    clip = CLIPModel(config).eval()
    tower = llava.model.vision_tower
    clip.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="session")
def llava_clip_dir(tmp_path_factory, llava_dir):
    return shared(tmp_path_factory, "llava-clip", lambda path: _save_llava_clip(path, llava_dir))


def _build_cdpruner(path, llava_dir):
    from click.testing import CliRunner

    from prumerge.cli import main

    result = CliRunner().invoke(main, ["build", str(llava_dir), "--out", str(path), "--method", "cdpruner",
                                       "--kept-tokens", "9", "--llm-precision", "fp32", "--llm-kv-cache", "float"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
def cdpruner_artifact(tmp_path_factory, llava_dir):
    """The tiny LLaVA built through the CLI with CDPruner keeping 9 of 64 patches (the graph reads the question),
    with its fp32 LLM: made once for every test file that asks (test_cdpruner, test_triton)."""
    return shared(tmp_path_factory, "cdpruner-9", lambda path: _build_cdpruner(path, llava_dir))


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory, clip_dir, llava_dir):
    """Builds (once per session) the artifact for (model, method, contract) and returns its directory."""
    from prumerge.export.build import build_artifact
    from prumerge.export.options import BuildOptions, GraphOptions, LlmOptions
    from prumerge.reduce.config import ReducerConfig

    import hashlib

    cache = {}
    models = {"clip": clip_dir, "llava": llava_dir}

    def make(model="llava", method="prumerge", output="padded", llm_precision=None, max_tokens=None,
             llm_kv_cache="float", **graph):
        """``graph``: GraphOptions fields (fp16, baseline, slim, ...)."""
        key = (model, method, output, llm_precision, max_tokens, llm_kv_cache, tuple(sorted(graph.items())))
        if key not in cache:
            options = BuildOptions(ReducerConfig(method=method, capacity=max_tokens), GraphOptions(contract=output, **graph),
                                   llm=LlmOptions(llm_precision, kv_cache=llm_kv_cache) if llm_precision else None)
            name = f"{model}-{method}-{output}-{hashlib.sha256(repr(key).encode()).hexdigest()[:12]}"
            cache[key] = shared(tmp_path_factory, name, lambda path: build_artifact(str(models[model]), path, options))
        return cache[key]

    return make


def rehash_manifest(directory: Path, edit) -> None:
    """Edit an artifact's manifest as an attacker would: change it, then recompute its own hash."""
    import json

    from prumerge.artifact.manifest import MANIFEST_NAME, _self_hash

    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    data.pop("manifest_sha256", None)
    data["manifest_sha256"] = _self_hash(data)
    path.write_text(json.dumps(data))


def quantised_reducer_check(onnx_path: Path) -> tuple[int, int]:
    """(reducer nodes, QuantizeLinear nodes) of an INT8 graph, after asserting that no reducer node reads a
    QuantizeLinear output (every reducer keeps its arithmetic float)."""
    import onnx

    from prumerge.artifact.node_stages import classify_nodes

    graph = onnx.load(str(onnx_path)).graph
    stages = classify_nodes(onnx_path)
    produced_by = {o: n for n in graph.node for o in n.output}
    reducer_nodes = [n for n in graph.node if stages.get(n.name) == "reducer"]
    for node in reducer_nodes:
        assert all(produced_by.get(i) is None or produced_by[i].op_type != "QuantizeLinear" for i in node.input), node.name
    return len(reducer_nodes), sum(n.op_type == "QuantizeLinear" for n in graph.node)

