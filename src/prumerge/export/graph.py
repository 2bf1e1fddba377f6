"""The exported vision graph: ``pixel_values -> tokens, num_tokens, indices, truncated``, and its ONNX export.

Two output contracts:
``padded``  static shapes ``[B, C, D]`` (C = capacity); nothing data-dependent, so TensorRT 10.3 (JetPack 6) builds it.
``dynamic`` the token axis is trimmed to the batch's longest count, ``[B, N, D]`` with ``N = max(num_tokens)``
            (``[1, num_tokens, D]`` at batch 1), via one NonZero: for onnxruntime and TensorRT with output allocators.
"""

from __future__ import annotations

import enum
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..model.encoder import PruMergeEncoder
from ..artifact.contract import INPUT_NAME, OUTPUT_NAMES, PLAIN_OPSET, QUESTION_ROWS_AXIS
from ..errors import ConfigError, ExportError

ATTENTION_OPS = ("Attention", "MultiHeadAttention")  # a graph holding one of these runs fused attention
EXTERNAL_DATA_BYTES = 64 << 20  # larger graphs keep weights in vision.onnx.data


class Contract(str, enum.Enum):
    """``artifact.contract.CONTRACTS`` as an enum (tests keep the two equal)."""

    PADDED = "padded"
    DYNAMIC = "dynamic"

    @classmethod
    def parse(cls, value) -> "Contract":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown output contract {value!r}; choose padded or dynamic") from None


class VisionGraph(nn.Module):
    """The module that is exported: the encoder, plus the trim for the dynamic contract."""

    def __init__(self, encoder: PruMergeEncoder, contract: Contract = Contract.PADDED) -> None:
        super().__init__()
        self.encoder = encoder
        self.contract = Contract.parse(contract)

    def forward(self, pixel_values: torch.Tensor, question_embeds: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None):
        # the contract's optional inputs by name (torch.export names the graph's inputs after these parameters)
        extra = {"question_embeds": question_embeds, "question_mask": question_mask}
        patches: list = []  # a question-reading graph's patch outputs (none for the others)
        out = self.encoder(pixel_values, patch_sink=patches if self.encoder.patch_output_names() else None,
                           **{name: extra[name] for name in self.encoder.reducer.spec.inputs})
        return (*in_contract(out, self.contract), *patches)


def in_contract(out, contract: Contract) -> tuple:
    """The reducer's output as the contract's four outputs (the dynamic contract trims the token axis)."""
    if contract is Contract.PADDED:
        return out.tokens, out.num_tokens, out.indices, out.truncated
    slots = torch.arange(out.tokens.shape[1], device=out.tokens.device)
    keep = torch.nonzero(slots < out.num_tokens.max()).squeeze(1)  # data-dependent length
    return out.tokens.index_select(1, keep), out.num_tokens, out.indices.index_select(1, keep), out.truncated


class ReducerGraph(nn.Module):
    """A question-reading reducer alone: the main graph's patch outputs and a question in, the contract out. An
    image asked a second question runs this (milliseconds) instead of the whole tower again."""

    def __init__(self, encoder: PruMergeEncoder, contract: Contract = Contract.PADDED) -> None:
        super().__init__()
        self.encoder = encoder
        self.contract = Contract.parse(contract)

    def forward(self, patch_tokens: torch.Tensor, question_embeds: torch.Tensor, question_mask: torch.Tensor,
                patch_embeds: torch.Tensor | None = None):
        from ..model.encoder import _fixed

        spec = self.encoder.reducer.spec
        relevance = {} if patch_embeds is None else {"image_embeds": patch_embeds}
        out = _fixed(*spec.run(self.encoder, patch_tokens, None, None, question_embeds=question_embeds,
                               question_mask=question_mask, **relevance))
        return in_contract(out, self.contract)


def export_reducer_graph(encoder: PruMergeEncoder, path: Path, contract: Contract, opset: int, batch_max: int) -> Path:
    """``vision_reducer.onnx`` (:class:`ReducerGraph`): inputs ``patch_tokens`` (+ ``patch_embeds``), the question;
    batch and question rows dynamic."""
    graph = ReducerGraph(encoder, contract).eval()
    example_batch = 2 if batch_max >= 2 else 1
    pixels = torch.randn(example_batch, 3, encoder.image_size, encoder.image_size).to(next(encoder.parameters()).dtype)
    question = question_example(encoder, example_batch)
    with torch.no_grad():
        patches: list = []
        encoder(pixels, patch_sink=patches, **question)
    names = encoder.patch_output_names()
    example = dict(zip(names, patches)) | question
    batch = torch.export.Dim("batch", min=1, max=batch_max)
    axes = {name: ({0: batch} if batch_max >= 2 else {}) for name in names} | question_axes(question, batch, batch_max)
    order = ["patch_tokens", *question, *names[1:]]  # forward's parameter order
    trace_to_onnx(graph, {n: example[n] for n in order}, {n: axes[n] for n in order}, OUTPUT_NAMES, path, opset,
                  external_data=False, what="the reducer graph")
    return path


def question_axes(names, batch, batch_max: int) -> dict:
    """The dynamic axes of the question inputs ``names``: the batch (when the graph batches) and any row count up
    to ``MAX_QUESTION_ROWS`` (the runtime embeds whatever the user asked)."""
    rows = torch.export.Dim(QUESTION_ROWS_AXIS, min=1, max=MAX_QUESTION_ROWS)
    return {name: ({0: batch, 1: rows} if batch_max >= 2 else {1: rows}) for name in names}


def trace_to_onnx(module: nn.Module, inputs: dict, dynamic_shapes: dict | None, output_names, path: Path, opset: int,
                  external_data: bool, what: str) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``module`` on ``inputs`` (input name -> example tensor, in ``forward``'s
    order), the exporter's warnings and logging silenced, saved to ``path``; a failure is one ExportError naming
    ``what``. Every graph of an artifact (vision, reducer, text) is traced here."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(module, tuple(inputs.values()), dynamo=True, opset_version=opset,
                                        input_names=list(inputs), output_names=list(output_names),
                                        dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
            program.save(str(path), external_data=external_data)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {what}: {exc}") from exc


MAX_QUESTION_ROWS = 4096  # the most embedding rows a question may have (a 4k-token prompt)


def question_example(encoder: PruMergeEncoder, batch: int) -> dict:
    """``{input name: tensor}`` of the method's inputs besides the pixels (CDPruner's question), for tracing: a few
    rows in the projected width, one of them padding."""
    if not encoder.reducer.spec.inputs:
        return {}
    from ..artifact.contract import probe_question

    return {name: torch.from_numpy(array) for name, array in probe_question(batch, encoder.question_width, 5).items()}


def input_specs(encoder: PruMergeEncoder, precision: str) -> list:
    """The graph's inputs as the manifest records them: the pixels, then the method's other inputs."""
    from ..artifact.manifest import TensorSpec

    pixels = TensorSpec(INPUT_NAME, "float32" if precision == "fp32" else "float16",
                        ["batch", 3, encoder.image_size, encoder.image_size])
    shapes = {"question_embeds": ["batch", QUESTION_ROWS_AXIS, encoder.question_width],
              "question_mask": ["batch", QUESTION_ROWS_AXIS]}
    return [pixels, *(TensorSpec(name, "float32", shapes[name]) for name in encoder.reducer.spec.inputs)]


def output_shapes(encoder: PruMergeEncoder, contract: Contract) -> dict:
    """Declared output shapes with named axes (``batch``; ``num_tokens_max`` for the dynamic contract)."""
    width = encoder.output_width
    slots = encoder.capacity if Contract.parse(contract) is Contract.PADDED else "num_tokens_max"
    shapes = (["batch", slots, width], ["batch"], ["batch", slots], ["batch"])
    patches = (["batch", encoder.num_patches, width], ["batch", encoder.num_patches, encoder.question_width])
    return dict(zip(OUTPUT_NAMES, shapes)) | dict(zip(encoder.patch_output_names(), patches))


def max_opset() -> int:
    """The newest ONNX opset both the exporter's op library (onnxscript) and the installed onnx know."""
    import re

    import onnx
    import onnxscript.onnx_opset as opsets

    known = [int(m.group(1)) for name in dir(opsets) for m in [re.fullmatch(r"opset(\d+)", name)] if m]
    return min(max(known), onnx.defs.onnx_opset_version())


def attention_form(graph) -> str:
    """``"fused"`` when the graph computes attention in a fused op, else ``"plain"`` (MatMul, Softmax, MatMul)."""
    return "fused" if any(node.op_type in ATTENTION_OPS for node in graph.node) else "plain"


def check_opset(opset: int) -> None:
    """One line for an opset the exporter cannot write (checked before the model is loaded)."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= max_opset():
        raise ConfigError(f"opset {opset} is not available from the dynamo exporter; use 18..{max_opset()}")


def export_onnx(
    encoder: PruMergeEncoder,
    path: Path,
    contract: Contract = Contract.PADDED,
    opset: int = PLAIN_OPSET,
    batch_max: int = 64,
) -> Path:
    """Export with ``torch.onnx.export(dynamo=True)``; the batch axis is dynamic (1..batch_max). ``opset`` >= 23
    writes attention as ONNX's fused ``Attention`` op (see ``artifact.contract.PLAIN_OPSET``)."""
    check_opset(opset)
    if batch_max < 1:
        raise ConfigError(f"batch_max must be >= 1, got {batch_max}")
    graph = VisionGraph(encoder, contract).eval()
    example_batch = 2 if batch_max >= 2 else 1
    dtype = next(encoder.parameters()).dtype
    example = torch.randn(example_batch, 3, encoder.image_size, encoder.image_size).to(dtype)
    batch = torch.export.Dim("batch", min=1, max=batch_max)
    dynamic_shapes = {INPUT_NAME: {0: batch}} if batch_max >= 2 else None
    extra = question_example(encoder, example_batch)
    if extra:
        dynamic_shapes = (dynamic_shapes or {INPUT_NAME: {}}) | question_axes(extra, batch, batch_max)
    size = sum(p.numel() * p.element_size() for p in encoder.parameters())
    path = Path(path)
    trace_to_onnx(graph, {INPUT_NAME: example, **extra}, dynamic_shapes, [*OUTPUT_NAMES, *encoder.patch_output_names()],
                  path, opset, external_data=size > EXTERNAL_DATA_BYTES,
                  what=f"the {Contract.parse(contract).value} contract")
    return path


def simplify(path: Path) -> dict:
    """Constant folding and graph simplification with onnxslim, in place; returns node counts before/after.

    The build validates the simplified graph against PyTorch afterwards like any other, so a simplification that
    changed a result would fail the build rather than ship.
    """
    import onnx

    try:
        import onnxslim
    except ImportError:
        return {"tool": None, "reason": "onnxslim is not installed"}
    path = Path(path)
    before = onnx.load(str(path))
    try:
        slimmed = onnxslim.slim(before)
    except Exception as exc:  # keep the exporter's graph; say why
        return {"tool": "onnxslim", "applied": False, "reason": str(exc)[:200]}
    nodes = (len(before.graph.node), len(slimmed.graph.node))
    # onnxslim drops node metadata; the exporter's module scopes and call stacks are what attributes nodes to
    # encoder / reducer / projector (profiling, INT8 exclusions, TensorRT FP32 pinning), so carry them over by name
    meta = {node.name: list(node.metadata_props) for node in before.graph.node}
    for node in slimmed.graph.node:
        if node.name in meta and not node.metadata_props:
            node.metadata_props.extend(meta[node.name])
    external = path.with_name(path.name + ".data")
    if external.exists():
        external.unlink()
        onnx.save(slimmed, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=external.name)
    else:
        onnx.save(slimmed, str(path))
    return {"tool": "onnxslim", "version": getattr(onnxslim, "__version__", None), "applied": True,
            "nodes_before": nodes[0], "nodes_after": nodes[1]}

