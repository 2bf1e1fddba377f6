"""PIL/numpy preprocessing equals transformers' PIL-backend processors, and bad images fail clearly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from prumerge.errors import InputError
from prumerge.artifact.preprocess_config import PreprocessConfig
from prumerge.runtime.preprocess import preprocess_batch, preprocess_image


def _images():
    rng = np.random.default_rng(0)
    out = []
    for (w, h), mode in zip([(400, 300), (300, 500), (336, 336), (120, 90), (1000, 333)], ["RGB", "RGBA", "L", "P", "RGB"]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(img.convert(mode))
    # real transparency: alpha from 0 (left) to 255 (right); transformers composites it on white
    rgba = np.concatenate([rng.integers(0, 256, (200, 256, 3), dtype=np.uint8),
                           np.tile(np.arange(256, dtype=np.uint8), (200, 1))[..., None]], axis=-1)
    out.append(Image.fromarray(rgba, "RGBA"))
    out.append(Image.fromarray(rgba[..., [0, 3]], "LA"))
    return out


@pytest.mark.parametrize("size", [224, 336])
def test_matches_clip_image_processor_pil(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    config = PreprocessConfig.from_processor_dict(hf.to_dict(), size)
    for image in _images():
        expected = hf(images=image, return_tensors="np")["pixel_values"][0]  # transformers' own RGB conversion
        np.testing.assert_allclose(preprocess_image(image, config), expected, atol=1e-5)


def test_matches_llava_pad_to_square():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    hf = LlavaImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_pad=True)
    config = PreprocessConfig.from_processor_dict(hf.to_dict(), 224)
    assert config.pad_to_square
    for image in _images():
        expected = hf(images=image, return_tensors="np")["pixel_values"][0]  # transformers' own RGB conversion
        np.testing.assert_allclose(preprocess_image(image, config), expected, atol=1e-5)


def test_input_kinds_agree(tmp_path):
    config = PreprocessConfig.from_processor_dict(None, 112)
    image = _images()[0]
    path = tmp_path / "x.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    batch = preprocess_batch([image, path, str(path), buffer.getvalue(), np.asarray(image)], config)
    assert batch.shape == (5, 3, 112, 112) and batch.dtype == np.float32
    for b in range(1, 5):
        np.testing.assert_array_equal(batch[0], batch[b])


def test_bad_images_are_clear_errors(tmp_path):
    config = PreprocessConfig.from_processor_dict(None, 112)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(InputError, match="cannot decode image .*broken.jpg"):
        preprocess_image(broken, config)
    good = tmp_path / "good.jpg"
    _images()[0].save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="cannot decode image .*truncated.jpg"):
        preprocess_image(truncated, config)
    with pytest.raises(InputError, match="not found"):
        preprocess_image(tmp_path / "missing.png", config)
    with pytest.raises(InputError, match="HxWxC"):
        preprocess_image(np.zeros((2, 3, 4, 5), np.uint8), config)
    with pytest.raises(InputError, match="no images"):
        preprocess_batch([], config)
    with pytest.raises(InputError, match="only square crops"):
        PreprocessConfig.from_processor_dict({"crop_size": {"height": 224, "width": 200}}, 224)
    # an explicit size other than the processor's scales resize and crop alike (the crop keeps its share)
    scaled = PreprocessConfig.from_processor_dict({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}, 448)
    assert (scaled.resize_shortest_edge, scaled.crop_height, scaled.crop_width) == (512, 448, 448)


def test_config_roundtrip():
    config = PreprocessConfig.from_processor_dict({"do_pad": True, "size": {"shortest_edge": 336}}, 336)
    assert PreprocessConfig.from_dict(config.to_dict()) == config
