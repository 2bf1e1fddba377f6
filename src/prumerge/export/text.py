"""The artifact's text graph (``build --text-encoder``): CLIP's text model and projection as ONNX, beside the CLIP
checkpoint's own ``tokenizer.json``, so a device embeds the instruction with onnxruntime and ``tokenizers`` alone.

The graph takes the instruction as the released CDPruner code feeds CLIP: the whole text tokenised once (start and
end tokens from the tokenizer's post-processor), zero-padded to a whole number of ``positions`` (CLIP's 77) and cut
into segments ``[S, positions]``; one embedding per segment. The segment count is a dynamic axis. Validated here
against PyTorch on the build's probe instructions (one segment and several), like every graph of the artifact.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ..model.text_relevance import TEXT_DIR, TEXT_GRAPH, TEXT_TOKENIZER, TextTower
from ..artifact.contract import TEXT_INPUTS, text_segments as segments
from .graph import trace_to_onnx

TEXT_OUTPUT = "text_embeds"
MAX_SEGMENTS = 64  # 64 x 77 tokens: longer instructions are refused by the runtime in one line
PROBE_TEXTS = ("what is in this picture", "describe the image in detail " * 40)  # one segment, and several
TOLERANCE = 1e-4  # onnxruntime vs PyTorch, relative to the embeddings' largest magnitude (float32 summation order)


def export_text_side(tower: TextTower, tokenizer: Path, stage: Path, opset: int, source: str) -> dict:
    """Write ``stage/text/`` (graph + tokenizer), validate the graph, return the manifest's ``text`` section."""
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    out = stage / TEXT_DIR
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, out / TEXT_TOKENIZER)
    positions = tower.positions
    example = [torch.from_numpy(a) for a in segments([1] * (positions + 2), positions)]  # 2 segments
    count = torch.export.Dim("segments", min=1, max=MAX_SEGMENTS)
    size = sum(p.numel() * p.element_size() for p in tower.parameters())
    trace_to_onnx(tower.eval(), dict(zip(TEXT_INPUTS, example)), {name: {0: count} for name in TEXT_INPUTS},
                  [TEXT_OUTPUT], out / TEXT_GRAPH, opset, external_data=size > (1 << 30), what="the text graph")

    encoder = Tokenizer.from_file(str(out / TEXT_TOKENIZER))
    session = ort.InferenceSession(str(out / TEXT_GRAPH), providers=["CPUExecutionProvider"])
    worst = 0.0
    for text in PROBE_TEXTS:
        ids, mask = segments(encoder.encode(text).ids, positions)
        got = session.run([TEXT_OUTPUT], dict(zip(TEXT_INPUTS, (ids, mask))))[0]
        with torch.no_grad():
            want = tower(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)))
    if not worst <= TOLERANCE:
        raise ExportError(f"the text graph disagrees with PyTorch by {worst:.2e} of its largest embedding (allowed "
                          f"{TOLERANCE:g})")
    return {"directory": TEXT_DIR, "graph": TEXT_GRAPH, "tokenizer": TEXT_TOKENIZER, "positions": positions,
            "width": int(tower.model.config.projection_dim), "source": source, "max_segments": MAX_SEGMENTS,
            "validation": {"texts": len(PROBE_TEXTS), "max_relative_error": worst, "tolerance": TOLERANCE}}
