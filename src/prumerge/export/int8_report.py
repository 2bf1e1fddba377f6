"""``calibrate --report``: what an INT8 build of a checkpoint would record, without building an artifact.

The checkpoint's fp32 vision graph is exported to a scratch folder and put through the build's own INT8 flow
(``prumerge.calib.int8.quantize_and_compare``), then timed against fp32. Here, in export, because it exports a
graph: calib holds the INT8 flow and imports nothing from the build.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..artifact.manifest import Int8Record


def int8_report(model: str, images, method: str = "prumerge", calibration_method: str = "minmax", target: str = "cpu",
                workdir: Path | None = None, image_size: int | None = None, float_layers: int = 0,
                target_jaccard: float | None = None, log=print) -> Int8Record:
    """Export ``model``'s fp32 vision graph, quantise it on ``images`` (a CalibrationSet), compare on the same set:
    the INT8 record a build would write (its ``agreement`` with ``latency_ratio`` measured here)."""
    from ..calib.int8 import latency_ratio, quantize_and_compare
    from ..model.encoder import PruMergeEncoder
    from .graph import export_onnx

    encoder = PruMergeEncoder.from_pretrained(model, method=method, image_size=image_size)
    pixels = images.pixels(encoder.preprocess_config())
    with tempfile.TemporaryDirectory(prefix="prumerge-int8-", dir=workdir) as scratch:
        fp32, int8 = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        export_onnx(encoder, fp32, "padded", batch_max=8)
        record = quantize_and_compare(fp32, int8, pixels, calibration_method, target, float_layers, target_jaccard, log)
        record.agreement.latency_ratio = latency_ratio(fp32, int8, pixels)
    return record
