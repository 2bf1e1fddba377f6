"""An int8 KV cache for the builder's decoder, its per-channel scales calibrated on the artifact's own prompts.

Why: after a long prompt (576 visual tokens and more) a decode step is mostly GroupQueryAttention reading the fp32
cache. Measured on the demo's SmolLM2-135M int4, 2 cores (``bench/bench_llamacpp.py --also``): 16.1 vs 25.5 ms per
token after 2000 positions (1.58x; 1.19x after 620, 1.14x after 60). It is not the default because onnxruntime's
CPU kernel computes a prefill over an int8 cache slower (0.71x at 589 positions, 0.87x at 40 and 160), which a
one-word answer after a long prompt pays and a long answer repays; and because answers move a little: 11 of 288
held-out PruMerge answers changed (accuracy 0.819 vs 0.844; all tokens 0.906 either way).

What is calibrated is what the cache will hold: the keys (after rotary) and values of prompts made the way the
runtime makes them, visual tokens from the artifact's own vision graph(s) inside the chat format, then greedy text.
Scales are static (onnxruntime's CPU kernel takes per-tensor or per-channel ones, not per-token), so each channel's
scale is its largest magnitude over those prompts / 127. A key channel is scaled by its rotary pair's norm: rotary
rotates the pair (d, d + head_size/2) by an angle that grows with position, so ``|k_d|`` reaches that norm at
positions a short calibration prompt never rotates to (onnxruntime-genai's calibration tool does the same).

The form written is the one onnxruntime-genai's builder writes for ``kv_cache_quant_scheme=int8_per_channel``
(checked against its output for SmolLM2: the three attributes, inputs 12 and 13 named ``model.layers.N.attn.k_scale``
/ ``v_scale`` of ``kv_heads x head_size`` floats, int8 cache inputs and outputs). It is written into the decoder the
build already has rather than by a second builder run, which would convert the whole model again (66 s for
SmolLM2; minutes for a 7B model) to change these few fields; the builder's own calibration tool also needs token-id
inputs, and this decoder takes embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ExportError

KV_QMAX = 127.0  # symmetric int8: the largest calibrated magnitude maps to 127 (the kernel clamps to [-128, 127])
CALIBRATION_QUESTIONS = ("Describe the picture in detail.", "What colour is the largest object?",
                         "How many objects are there?", "Is there a person in the image? Answer yes or no.")
GENERATED_TOKENS = 24  # greedy text after each prompt: the cache holds generated positions too
MIN_SCALE = 1e-8  # a channel that was zero on every prompt still needs a positive scale


def calibration_prompts(pipeline, visual: Sequence[np.ndarray]) -> tuple[list, int]:
    """(prompt embeddings [T, D] as the runtime builds them: one image's tokens and a question in the chat format,
    text alone when there are no visual tokens; the number of visual tokens placed in them)."""
    from ..runtime.llm import Stopwatch

    prompts, placed = [], 0
    for i, tokens in enumerate(visual or [None] * len(CALIBRATION_QUESTIONS)):
        question = CALIBRATION_QUESTIONS[i % len(CALIBRATION_QUESTIONS)]
        text = question if tokens is None else f"{pipeline.marker}\n{question}"
        embeds, counts = pipeline.build_prompt([], text, True, Stopwatch(), visual=None if tokens is None else [tokens])
        prompts.append(embeds)
        placed += sum(counts)
    return prompts, placed


def rotary_envelope(keys: np.ndarray, interleaved: bool) -> np.ndarray:
    """``|k|`` bounded for every position: each channel replaced by the norm of its rotary pair. ``keys`` [..., D]."""
    half = keys.shape[-1] // 2
    if interleaved:  # pairs (2i, 2i + 1)
        norm = np.sqrt(keys[..., 0::2] ** 2 + keys[..., 1::2] ** 2)
        return np.repeat(norm, 2, axis=-1)
    norm = np.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2)  # pairs (i, i + D/2)
    return np.concatenate([norm, norm], axis=-1)


def measure_ranges(decoder, prompts: Sequence[np.ndarray], interleaved: bool,
                   generated: int = GENERATED_TOKENS) -> tuple[np.ndarray, np.ndarray, int]:
    """(key magnitudes [layers, kv_heads * head_size] (rotary envelope), value magnitudes (same shape), positions
    seen): the largest over every position of every prompt and its greedy continuation, read from the cache."""
    layers = decoder.layers
    width = decoder.kv_shape[0] * decoder.kv_shape[1]
    keys, values = np.zeros((layers, width), np.float32), np.zeros((layers, width), np.float32)
    positions = 0
    for embeds in prompts:
        room = min(generated, decoder.context_length - embeds.shape[0])
        cache = decoder.start()  # grown by concatenation: every position stays readable
        logits, cache = decoder.step(embeds, cache)
        for _ in range(max(room - 1, 0)):
            logits, cache = decoder.step(decoder.embed([int(np.argmax(logits))]), cache)
        positions += cache.length
        for layer, (past_key, past_value) in enumerate(zip(decoder.io.past_keys, decoder.io.past_values)):
            k = cache.values[past_key].numpy()[0].astype(np.float32)  # [kv_heads, T, head_size]
            v = cache.values[past_value].numpy()[0].astype(np.float32)
            keys[layer] = np.maximum(keys[layer], rotary_envelope(k, interleaved).max(axis=1).reshape(-1))
            values[layer] = np.maximum(values[layer], np.abs(v).max(axis=1).reshape(-1))
    if not (np.isfinite(keys).all() and np.isfinite(values).all()):
        raise ExportError("the KV cache calibration saw NaN or Inf in the decoder's keys/values; build without "
                          "--llm-kv-cache int8")
    return keys, values, positions


def quantize_cache(model, model_path: Path, key_scales: np.ndarray, value_scales: np.ndarray) -> None:
    """Rewrite the decoder ``model`` (loaded from ``model_path`` without its weights, which stay in their external
    data file) to keep an int8 cache with these per-layer, per-channel scales, and save it there."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if len(nodes) != len(key_scales):
        raise ExportError(f"{model_path}: {len(nodes)} GroupQueryAttention nodes for {len(key_scales)} layers of "
                          "calibrated scales; an int8 KV cache needs the builder's GQA decoder (build without "
                          "--llm-kv-cache int8)")
    cache_io = set()
    for layer, node in enumerate(nodes):
        names = (f"model.layers.{layer}.attn.k_scale", f"model.layers.{layer}.attn.v_scale")
        for name, scale in zip(names, (key_scales[layer], value_scales[layer])):
            graph.initializer.append(numpy_helper.from_array(np.maximum(scale, MIN_SCALE).astype(np.float32), name))
        while len(node.input) < 12:
            node.input.append("")
        del node.input[12:]
        node.input.extend(names)
        kept = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                                      helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                                      helper.make_attribute("kv_cache_bit_width", 8)])
        cache_io.update((node.input[3], node.input[4], node.output[1], node.output[2]))
    for value in list(graph.input) + list(graph.output):
        if value.name in cache_io:
            value.type.tensor_type.elem_type = TensorProto.INT8
    onnx.save(model, str(model_path))


PREFILL_SWITCH = "float_prefill"  # the mixed decoder's bool input: True runs a first step's attention in float


def float_prefill(model, model_path: Path) -> None:
    """Give the int8-cache decoder ``model`` a float prefill: each layer's GroupQueryAttention becomes an ``If`` on
    the scalar input ``float_prefill``. True (a first step, from an empty cache): attention over the new positions
    in float32, as the float decoder computes it, and the presents quantised in the graph with the layer's own
    calibrated scales (``round(x / scale)`` clipped to int8: a first layer's keys equal those the int8 kernel writes),
    so the cache the decode steps read is the int8 cache. False: the int8 kernel, unchanged.

    Why: onnxruntime's CPU kernel is slow at a prefill over an int8 cache (measured on the demo's SmolLM2, 2 cores:
    1554 vs 1103 ms at 589 positions, 9.8 vs 4.7 s at 2000) and fast at decoding from one (14.3 vs 21.6 ms a token
    after 2000 positions). Both forms live in one session, so the weights (every MatMulNBits, outside the ``If``)
    are loaded and prepacked once: a second session for the float form cost 134 MB more and onnxruntime's Python API
    has no shared prepacked-weights container (without prepacking a step is 35x slower)."""
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if not nodes or any(len(n.input) < 14 or not n.input[12] for n in nodes):
        raise ExportError(f"{model_path}: a float prefill needs the int8-cache GroupQueryAttention decoder "
                          "(quantize_cache first)")
    rewritten, layer = [], -1
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            rewritten.append(node)
            continue
        layer += 1
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        heads = attributes["kv_num_heads"]
        out, key, value = node.output
        k_scale, v_scale = node.input[12], node.input[13]
        tag = f"/model/layers.{layer}/attn/float_prefill"
        float_inputs = list(node.input[:12])
        float_inputs[3] = float_inputs[4] = ""  # no past: the cache is empty at a first step
        while float_inputs[-1] == "":
            float_inputs.pop()
        float_attrs = {k: v for k, v in attributes.items() if k not in ("k_quant_type", "v_quant_type",
                                                                          "kv_cache_bit_width")}
        body = [helper.make_node("GroupQueryAttention", float_inputs, [f"{tag}/out", f"{tag}/key", f"{tag}/value"],
                                 domain="com.microsoft", name=f"{tag}/GroupQueryAttention", **float_attrs)]
        for which, scale in (("key", k_scale), ("value", v_scale)):
            body += [
                helper.make_node("Reshape", [scale, f"{tag}/scale_shape"], [f"{tag}/{which}_scale"]),
                helper.make_node("Div", [f"{tag}/{which}", f"{tag}/{which}_scale"], [f"{tag}/{which}_scaled"]),
                helper.make_node("Round", [f"{tag}/{which}_scaled"], [f"{tag}/{which}_rounded"]),
                helper.make_node("Clip", [f"{tag}/{which}_rounded", f"{tag}/low", f"{tag}/high"],
                                 [f"{tag}/{which}_clipped"]),
                helper.make_node("Cast", [f"{tag}/{which}_clipped"], [f"{tag}/{which}_int8"], to=TensorProto.INT8)]
        body[1:1] = [
            helper.make_node("Constant", [], [f"{tag}/scale_shape"],
                             value=helper.make_tensor("shape", TensorProto.INT64, [4], [1, heads, 1, -1])),
            helper.make_node("Constant", [], [f"{tag}/low"], value=helper.make_tensor("low", TensorProto.FLOAT, [], [-128.0])),
            helper.make_node("Constant", [], [f"{tag}/high"], value=helper.make_tensor("high", TensorProto.FLOAT, [], [127.0]))]

        def branch(name, nodes_, outputs):
            return helper.make_graph(nodes_, name, [], [
                helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, None),
                helper.make_tensor_value_info(outputs[1], TensorProto.INT8, None),
                helper.make_tensor_value_info(outputs[2], TensorProto.INT8, None)])

        then = branch(f"{tag}/float", body, [f"{tag}/out", f"{tag}/key_int8", f"{tag}/value_int8"])
        int8_tag = f"/model/layers.{layer}/attn/int8"
        quantised = onnx.NodeProto()
        quantised.CopyFrom(node)
        del quantised.output[:]
        quantised.output.extend([f"{int8_tag}/out", f"{int8_tag}/key", f"{int8_tag}/value"])
        otherwise = branch(int8_tag, [quantised], list(quantised.output))
        rewritten.append(helper.make_node("If", [PREFILL_SWITCH], [out, key, value], name=f"{tag}/If",
                                          then_branch=then, else_branch=otherwise))
    del graph.node[:]
    graph.node.extend(rewritten)
    graph.input.append(helper.make_tensor_value_info(PREFILL_SWITCH, TensorProto.BOOL, []))
    onnx.save(model, str(model_path))


def int8_kv_cache(directory: Path, section: dict, visual: Sequence[np.ndarray], images: dict,
                  prefill: str = "int8") -> dict:
    """Calibrate and write the int8 cache into the float decoder ``section`` describes (``directory`` holds its
    ``llm/``); returns the manifest's ``llm.kv_cache`` record. ``visual``: one image's tokens per prompt, from the
    artifact's vision graph(s); ``images``: where they came from (recorded). ``prefill``: "float" adds the float
    first step (:func:`float_prefill`); "int8" leaves every step on the int8 kernel."""
    import onnx

    from ..artifact.manifest import LLMSection, inside
    from ..runtime.llm import OnnxDecoder, ensure_tokenizers
    from ..runtime.pipeline import Pipeline

    spec = LLMSection.from_dict(section, "llm")
    base = inside(directory, spec.directory)
    decoder = OnnxDecoder(directory, spec)
    tokenizer = ensure_tokenizers().from_file(str(inside(base, spec.tokenizer)))
    pipeline = Pipeline(None, decoder, tokenizer, spec, graph=_Width(spec.hidden_size))
    path = inside(base, spec.decoder)
    model = onnx.load(str(path), load_external_data=False)
    interleaved = any(a.name == "rotary_interleaved" and a.i for n in model.graph.node
                      if n.op_type == "GroupQueryAttention" for a in n.attribute)
    prompts, placed = calibration_prompts(pipeline, visual)
    keys, values, positions = measure_ranges(decoder, prompts, interleaved)
    del decoder, pipeline  # the session's file is rewritten next
    quantize_cache(model, path, keys / KV_QMAX, values / KV_QMAX)
    record = {}
    if prefill == "float":
        float_prefill(onnx.load(str(path), load_external_data=False), path)
        record = {"prefill_switch": PREFILL_SWITCH}
    return record | {"dtype": "int8", "scales": "per_channel", "rotary_envelope": True,
            "calibration": {"prompts": len(prompts), "visual_tokens": int(placed), "positions": positions,
                            "images": images}}


class _Width:
    """What a ``Pipeline`` reads of a vision graph section when there is none: the tokens' width."""

    method = "calibration"

    def __init__(self, width: int) -> None:
        self.output_width = width
