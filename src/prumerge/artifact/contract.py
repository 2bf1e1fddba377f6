"""The vision graph's interface: input and output names, and the output contract as numpy arrays.

``tokens [B, C, D]``, ``num_tokens [B]`` int64, ``indices [B, C]`` int64 (source patch; ``EXTRA_TOKEN_INDEX`` for
PruMerge's extra token, ``PADDING_INDEX`` for padding, ``CLS_TOKEN_INDEX`` for a CLS token VisionZip keeps,
``CONTEXTUAL_TOKEN_INDEX`` for VisionZip's merged contextual tokens), ``truncated [B]`` bool. Every session binds outputs by these
names, never by position. numpy only: both the build (export, validation) and the runtime import it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

INPUT_NAME = "pixel_values"
# a graph whose reducer reads the question (cdpruner) takes its rows in the LLM's input-embedding space and which of
# them are real: ``question_embeds [B, S, D]`` float, ``question_mask [B, S]`` float (1 real, 0 padding)
QUESTION_INPUTS = ("question_embeds", "question_mask")
QUESTION_ROWS_AXIS = "question_rows"  # their token axis, dynamic (the graph's, the manifest's, TensorRT's profile)
# padded: static [B, K_max, D] (TensorRT 10.3); dynamic: the token axis trimmed to the batch's longest count
CONTRACTS = ("padded", "dynamic")
OUTPUT_NAMES = ("tokens", "num_tokens", "indices", "truncated")
# a question-reading graph also outputs what its reducer chooses among (the projected patches; with a CLIP text side
# their CLIP image embeddings), so a second question on the same image runs the reducer graph alone on them
PATCH_OUTPUTS = ("patch_tokens", "patch_embeds")
REDUCER_GRAPH_FILE = "vision_reducer.onnx"
TEXT_INPUTS = ("input_ids", "attention_mask")  # the text graph's (build --text-encoder)
EXTRA_TOKEN_INDEX = -1
PADDING_INDEX = -2
CLS_TOKEN_INDEX = -3
CONTEXTUAL_TOKEN_INDEX = -4

# The vision graph's default opset, for every target: attention as plain MatMul / Softmax / MatMul. From opset 23 the
# exporter writes each encoder layer's scaled_dot_product_attention as one ONNX Attention node instead (onnxruntime
# >= 1.23 runs it as one kernel; onnxruntime's own transformer optimizer cannot fuse the plain form). Measured side by
# side on this 2-core CPU the fused kernel is slower on ViT-L/14-336 (1556 vs 1458 ms, bench/bench_export.py) and 4 %
# faster on DINOv2-S, and TensorRT 10.3 (JetPack 6) cannot parse it: fused attention is --opset 23, for where it
# measures faster. The build's command line repeats any other opset.
PLAIN_OPSET = 18


@dataclasses.dataclass
class VisionOutput:
    """The token contract as numpy arrays; ``tokens[b, :num_tokens[b]]`` are image ``b``'s LLM-ready tokens."""

    tokens: np.ndarray  # [B, N, D]
    num_tokens: np.ndarray  # [B] int64
    indices: np.ndarray  # [B, N] int64 source patch, -1 extra token, -2 padding
    truncated: np.ndarray  # [B] bool

    def image(self, b: int) -> np.ndarray:
        return self.tokens[b, : int(self.num_tokens[b])]

    def per_image(self) -> list[np.ndarray]:
        return [self.image(b) for b in range(len(self.num_tokens))]

    @classmethod
    def from_named(cls, outputs: dict) -> "VisionOutput":
        """From ``{output name: array}`` as a session returns it (bound by name)."""
        missing = [n for n in OUTPUT_NAMES if n not in outputs]
        if missing:
            raise KeyError(f"the vision graph did not produce {', '.join(missing)}")
        return cls(np.asarray(outputs["tokens"]), np.asarray(outputs["num_tokens"]).astype(np.int64),
                   np.asarray(outputs["indices"]).astype(np.int64), np.asarray(outputs["truncated"]).astype(bool))


def concat_outputs(parts: list[VisionOutput], padding_index: int) -> VisionOutput:
    """Batches of one contract joined, the token axis padded to the widest (dynamic contract batches differ)."""
    width = max(p.tokens.shape[1] for p in parts)

    def pad(a, fill):
        out = np.full((a.shape[0], width, *a.shape[2:]), fill, dtype=a.dtype)
        out[:, : a.shape[1]] = a
        return out

    return VisionOutput(
        np.concatenate([pad(p.tokens, 0) for p in parts]),
        np.concatenate([p.num_tokens for p in parts]),
        np.concatenate([pad(p.indices, padding_index) for p in parts]),
        np.concatenate([p.truncated for p in parts]),
    )


# the graphs an artifact can hold, in the order reports list them (a --baseline build adds "none"): the manifest's
# vocabulary, kept here because the contract imports no build code; tests/test_registry.py keeps it equal to the
# reducer registry's names (``prumerge.reduce.registry``, where a method is declared)
METHODS = ("none", "prumerge", "prumerge+", "visionzip", "divprune", "cdpruner")
# the methods whose token count depends on the image (a capacity bounds it; calibrate measures it); the others keep
# a fixed count set by their options (the registry's ``ReducerSpec.adaptive``; the same test keeps them equal)
ADAPTIVE_METHODS = ("prumerge", "prumerge+")


def check_method_request(artifacts, methods) -> list:
    """``methods`` as a list after refusing unknown names and an empty artifact list (``profile``, ``evaluate``)."""
    from ..errors import ConfigError

    methods = list(methods or [])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not artifacts:
        raise ConfigError("give at least one artifact directory")
    return methods


def probe_question(batch: int, width: int, rows: int = 6, seed: int = 0) -> dict:
    """``{name: array}`` for ``QUESTION_INPUTS``: a fixed random question (``rows`` embedding rows, the last one
    padding) for build-time checks of a graph that reads one (validation, verify). Both sides of a comparison get
    the same arrays; what the question says does not matter there, that both see it does."""
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((batch, rows, width)).astype(np.float32)
    mask = np.ones((batch, rows), dtype=np.float32)
    mask[:, -1] = 0.0
    return dict(zip(QUESTION_INPUTS, (embeds, mask)))



def text_segments(ids: list, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids [S, positions], attention_mask [S, positions])`` for the text graph: a question's token ids
    zero-padded to whole segments (id 0, mask 0) and cut, as the released CDPruner code pads the tokenizer's output
    and reshapes it. The build exports and validates with it; the runtime feeds the graph with it."""
    count = max(1, -(-len(ids) // positions))
    padded = np.zeros(count * positions, dtype=np.int64)
    padded[: len(ids)] = ids
    mask = np.zeros(count * positions, dtype=np.int64)
    mask[: len(ids)] = 1
    return padded.reshape(count, positions), mask.reshape(count, positions)
