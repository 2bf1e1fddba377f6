"""The quantised decoder on onnxruntime: embeddings in, logits out, KV cache kept as OrtValues between steps.

The decoder (built by onnxruntime-genai's builder with ``exclude_embeds``) takes ``inputs_embeds``, an attention
mask and the past key/values; it computes rotary positions itself from the mask, so positions are contiguous.
Presents are bound as outputs and fed back as the next step's past without a copy through numpy (I/O binding).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError, InputError


class OnnxDecoder:
    def __init__(self, directory: Path, spec, provider: str = "cpu", threads: int | None = None) -> None:
        """``threads``: onnxruntime's intra-op threads for this decoder (default: its own choice, every core);
        several decoders in one process or machine (Triton's LLM instances) each take a share instead of all
        contending for every core."""
        import onnxruntime as ort

        from .vision import PROVIDERS

        self.spec = spec
        from ..artifact.manifest import inside

        base = inside(directory, spec.directory)
        wanted = [p for p in PROVIDERS.get(provider, ["CPUExecutionProvider"]) if p in ort.get_available_providers()
                  and p != "TensorrtExecutionProvider"]
        options = ort.SessionOptions()
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise InputError(f"decoder threads must be a positive integer, got {threads!r}")
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(inside(base, spec.decoder)), options, providers=wanted)
        except Exception as exc:
            hint = (" (its KV cache is int8: this onnxruntime's GroupQueryAttention may not take a quantised cache; "
                    "upgrade onnxruntime or rebuild without --llm-kv-cache int8)") if spec.kv_dtype == "int8" else ""
            raise ArtifactError(f"onnxruntime cannot load the LLM decoder {base / spec.decoder}{hint}: {exc}") from exc
        try:
            self.embeddings = np.load(inside(base, spec.embeddings), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read the embedding table {base / spec.embeddings}: {exc}") from exc
        self.io = spec.io
        self.layers = spec.num_layers
        self.kv_shape = (spec.num_kv_heads, spec.head_size)
        self.kv_dtype = np.dtype(spec.kv_dtype)
        self.embeds_dtype = np.dtype(spec.embeds_dtype)
        self.context_length = spec.context_length
        self._names = self.io.cache_names()
        # a mixed decoder (export.kv_cache.float_prefill): a first step's attention in float, the cache int8
        self.prefill_switch = spec.prefill_switch
        check_decoder_io(self.session, spec, base / spec.decoder)
        if self.embeddings.ndim != 2 or self.embeddings.shape[1] != spec.hidden_size:
            raise ArtifactError(f"the embedding table {base / spec.embeddings} has shape {self.embeddings.shape}, "
                                f"the manifest says [vocabulary, {spec.hidden_size}]: the artifact was altered")

    def embed(self, token_ids) -> np.ndarray:
        return embed_ids(self.embeddings, token_ids)

    def start(self, capacity: int | None = None) -> "KVCache":
        """An empty cache. ``capacity`` (positions the generation can reach): with a decoder that shares past and
        present (GroupQueryAttention, ``kv_share_buffer``), one buffer of that length per layer is allocated now
        and every step writes its keys/values into it in place, as onnxruntime-genai's own generator runs these
        models, so a step's cost does not grow with copying the cache. Otherwise the cache grows by concatenation."""
        import onnxruntime as ort

        if capacity and self.spec.kv_share_buffer:
            length = min(int(capacity), self.context_length)
            shape = (1, self.kv_shape[0], length, self.kv_shape[1])
            arrays = {past: np.zeros(shape, dtype=self.kv_dtype) for past, _ in self._names}
            values = {past: ort.OrtValue.ortvalue_from_numpy(array) for past, array in arrays.items()}  # no copy
            return KVCache(values, 0, capacity=length, bound=self._bind_shared(values, length, arrays))
        empty = np.zeros((1, *self.kv_shape[:1], 0, self.kv_shape[1]), dtype=self.kv_dtype)
        return KVCache({past: ort.OrtValue.ortvalue_from_numpy(empty) for past, _ in self._names}, 0)

    def _bind_shared(self, values: dict, length: int, arrays: dict) -> "SharedBinding":
        """One I/O binding for a whole generation on shared buffers: past and present are the same buffers at
        every step, so they are bound once instead of 2 x layers binds a step; a decoder whose logits are one row
        (pruned LM head) writes them into one preallocated buffer; the attention mask is a view of one row of ones.
        What changes between steps is the new embeddings and the mask's length."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for past, present in self._names:
            binding.bind_ortvalue_input(past, values[past])
            binding.bind_ortvalue_output(present, values[past])
        logits = None
        if self.spec.logits == "last":
            dtype = _NP_TYPES[next(o.type for o in self.session.get_outputs() if o.name == self.io.logits)]
            logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, self.spec.vocab_size), dtype=dtype))
            binding.bind_ortvalue_output(self.io.logits, logits)
        if self.prefill_switch:
            binding.bind_cpu_input(self.prefill_switch, _FALSE)
        return SharedBinding(binding, logits, np.ones((1, length), dtype=np.int64), arrays)

    def step(self, embeds: np.ndarray, cache: "KVCache", all_logits: bool = False) -> tuple[np.ndarray, "KVCache"]:
        """Run ``embeds [T, D]`` after ``cache``; return the last position's logits [V] (or all, [T, V], from a
        decoder that computes every row: one built with the LM head on the last position only cannot) and the
        grown cache."""
        if all_logits and self.spec.logits == "last":
            raise InputError("this decoder computes the last position's logits only (its LM head was pruned at "
                             "build: prune_lm_head); feed the positions one step each to score every one")
        total = cache.length + embeds.shape[0]
        if total > self.context_length:
            raise InputError(f"the sequence needs {total} positions but the model's context is {self.context_length}")
        if cache.capacity is not None and total > cache.capacity:
            raise InputError(f"the sequence needs {total} positions but the cache was allocated for {cache.capacity}")
        embeds = np.ascontiguousarray(embeds[None].astype(self.embeds_dtype))
        if self.prefill_switch and cache.length == 0:
            return self._float_prefill(embeds, cache, all_logits)
        if cache.bound is not None:  # shared buffers: only the embeddings and the mask's length change
            shared = cache.bound
            shared.binding.bind_cpu_input(self.io.inputs_embeds, embeds)
            shared.binding.bind_cpu_input(self.io.attention_mask, shared.mask[:, :total])
            if shared.logits is None:  # every row: bound (last of the outputs) anew each step, as its shape follows
                shared.binding.bind_output(self.io.logits, "cpu")  # the step's length (a kept one is reused: error)
            self.session.run_with_iobinding(shared.binding)
            raw = shared.logits if shared.logits is not None else shared.binding.get_outputs()[-1]
            return _rows(raw, all_logits), KVCache(cache.values, total, capacity=cache.capacity, bound=shared)
        logits, values = self._run_growing(embeds, total, cache.values, _FALSE)
        return _rows(logits, all_logits), KVCache(values, total)

    def _run_growing(self, embeds: np.ndarray, total: int, past: dict, switch: np.ndarray) -> tuple:
        """One step whose presents onnxruntime allocates (past + new positions): (logits, {past name: present})."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.io.inputs_embeds, embeds)
        binding.bind_cpu_input(self.io.attention_mask, np.ones((1, total), dtype=np.int64))
        if self.prefill_switch:
            binding.bind_cpu_input(self.prefill_switch, switch)
        bound = []
        for name, present in self._names:
            binding.bind_ortvalue_input(name, past[name])
            binding.bind_output(present, "cpu")
            bound.append(present)
        binding.bind_output(self.io.logits, "cpu")
        bound.append(self.io.logits)
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(bound, binding.get_outputs()))  # get_outputs() follows the binding order
        return outputs[self.io.logits], {name: outputs[present] for name, present in self._names}

    def _float_prefill(self, embeds: np.ndarray, cache: "KVCache", all_logits: bool) -> tuple:
        """A mixed decoder's first step: attention in float over the new positions, the presents (int8, quantised
        in the graph) written into the preallocated buffers when the generation has them, else the new cache."""
        import onnxruntime as ort

        count = embeds.shape[1]
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.kv_shape[0], 0, self.kv_shape[1]), self.kv_dtype))
        logits, presents = self._run_growing(embeds, count, {name: empty for name, _ in self._names}, _TRUE)
        if cache.bound is None:
            return _rows(logits, all_logits), KVCache(presents, count)
        for name, array in cache.bound.arrays.items():  # the buffers the shared binding reads and writes
            array[:, :, :count] = presents[name].numpy()
        return _rows(logits, all_logits), KVCache(cache.values, count, capacity=cache.capacity, bound=cache.bound)


def embed_ids(table: np.ndarray, token_ids) -> np.ndarray:
    """``[T, D]`` float32 rows of the embedding ``table`` for ``token_ids`` (checked against its vocabulary)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise InputError(f"token id out of range for a vocabulary of {table.shape[0]}")
    return np.asarray(table[ids], dtype=np.float32)


def plain_tokenizer(tokenizer):
    """A copy of ``tokenizer`` (``tokenizers.Tokenizer``) that encodes special-token strings as plain text: a user
    typing ``<|im_end|>`` gets text, not the control token."""
    plain = type(tokenizer).from_str(tokenizer.to_str())
    plain.encode_special_tokens = True
    return plain


def _rows(logits, all_logits: bool) -> np.ndarray:
    """A step's logits OrtValue [1, T, V] -> the last row [V] (or every row, [T, V]) in float32. Logits that are not
    finite (a decoder whose weights or cache scales were altered: NaN, inf, zero scales) are refused instead of
    decoding an argmax of NaN into an empty answer."""
    rows = logits.numpy()[0]
    rows = (rows if all_logits else rows[-1]).astype(np.float32)
    if not np.isfinite(rows).all():
        raise ArtifactError("the LLM decoder produced non-finite logits: its weights or KV-cache scales are damaged; "
                            "rebuild the artifact")
    return rows


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def check_decoder_io(session, spec, path) -> None:
    """The decoder as loaded against what the manifest says of it: every input and output it names exists, the
    embeddings' and the cache's element types and the cache's heads and head size are the graph's. A manifest
    edited (and re-hashed) to disagree with its decoder is refused here in one line, never discovered as a crash
    in the first step. (The vision graph gets the same check in ``VisionSession``.)"""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    io = spec.io
    wanted_in = [io.inputs_embeds, io.attention_mask, *io.past_keys, *io.past_values]
    wanted_out = [io.logits, *io.present_keys, *io.present_values]
    switch = spec.prefill_switch
    if switch:
        wanted_in.append(switch)
    missing = [n for n in wanted_in if n not in inputs] + [n for n in wanted_out if n not in outputs]
    if missing:
        raise ArtifactError(f"the manifest names decoder tensors {', '.join(missing[:4])} that {path} does not have: "
                            "the manifest does not describe this decoder")
    if switch and inputs[switch].type != "tensor(bool)":
        raise ArtifactError(f"the decoder {path} input {switch} (llm.kv_cache.prefill_switch) is "
                            f"{inputs[switch].type}, not a bool: the manifest does not describe this decoder")
    checks = [("llm.embeds_dtype", spec.embeds_dtype, _ORT_TYPES.get(inputs[io.inputs_embeds].type)),
              ("llm.kv_dtype", spec.kv_dtype, _ORT_TYPES.get(inputs[io.past_keys[0]].type))]
    shape = inputs[io.past_keys[0]].shape  # [batch, kv heads, positions, head size]
    if len(shape) == 4:
        checks += [("llm.num_kv_heads", spec.num_kv_heads, shape[1] if isinstance(shape[1], int) else spec.num_kv_heads),
                   ("llm.head_size", spec.head_size, shape[3] if isinstance(shape[3], int) else spec.head_size)]
    embeds = inputs[io.inputs_embeds].shape
    if embeds and isinstance(embeds[-1], int):
        checks.append(("llm.hidden_size", spec.hidden_size, embeds[-1]))
    for field, recorded, actual in checks:
        if recorded != actual:
            raise ArtifactError(f"manifest field {field} is {recorded!r} but the decoder {path} has {actual!r}: the "
                                "manifest does not describe this decoder; rebuild the artifact")


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_TRUE, _FALSE = np.array(True), np.array(False)  # a mixed decoder's prefill switch


class SharedBinding:
    """What a shared-buffer generation binds once: the I/O binding (past = present buffers), the preallocated
    logits buffer (None: the decoder's logits are every row, allocated by onnxruntime each step), a row of ones the
    attention mask is a view of, the buffers' numpy arrays."""

    def __init__(self, binding, logits, mask: np.ndarray, arrays: dict) -> None:
        self.binding = binding
        self.logits = logits
        self.mask = mask
        self.arrays = arrays  # the numpy memory of the bound buffers (a mixed decoder's prefill writes into it)


class KVCache:
    """Past keys/values as OrtValues: grown by concatenation, or (``capacity`` set) one preallocated buffer per
    layer written in place, ``length`` positions of it valid."""

    def __init__(self, values: dict, length: int, capacity: int | None = None,
                 bound: SharedBinding | None = None) -> None:
        self.values = values
        self.length = length
        self.capacity = capacity
        self.bound = bound  # the preallocated buffers' binding, shared by every step of the generation


def choose_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling over ``softmax(logits / temperature)``."""
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = np.asarray(logits, dtype=np.float64)  # fp16 logits / 1e-300 would be 0/0 (NaN) in float16
    scaled = (logits - logits.max()) / temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
    chosen = probs[keep] / probs[keep].sum()
    return int(rng.choice(keep, p=chosen))


class Stopwatch:
    """Named wall-clock intervals in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict = {}

    def timed(self, name: str):
        watch = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                watch.ms[name] = watch.ms.get(name, 0.0) + (time.perf_counter() - self.start) * 1e3

        return _Span()


def ensure_tokenizers():
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - a dependency
        raise BackendUnavailableError("the tokenizers package is needed to run the LLM") from exc
    return Tokenizer
