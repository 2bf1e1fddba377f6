"""Image preprocessing with PIL + numpy only, from the artifact's own description.

Devices get no transformers and no torchvision: the build writes the processor's settings (size, crop, mean/std,
pad-to-square) into the artifact, and this module reproduces ``CLIPImageProcessorPil`` / ``LlavaImageProcessorPil``
from them (checked pixel for pixel in the tests).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..artifact.preprocess_config import PreprocessConfig
from ..errors import InputError

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
# bounds on what preprocessing allocates, checked from the sizes before any resize or pad: a 377-byte PNG of
# 100000x1 pixels would otherwise be resized to 336 x 33.6M (the decompression-bomb check bounds only the input)
MAX_ASPECT_RATIO = 100.0
MAX_STEP_PIXELS = 64 * 1024 * 1024


def load_image(image: ImageLike) -> Image.Image:
    """Open a path, bytes, PIL image or HWC uint8 array as an RGB PIL image; one clear error otherwise."""
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise InputError(f"an image array must be HxW or HxWxC with C in 1, 3, 4; got shape {image.shape}")
        if image.dtype != np.uint8:
            if np.issubdtype(image.dtype, np.floating) and image.size and 0.0 <= image.min() and image.max() <= 1.0:
                image = np.round(image * 255)
            image = np.clip(image, 0, 255).astype(np.uint8)
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    elif isinstance(image, (bytes, bytearray)):
        pil = _open(io.BytesIO(image), "<bytes>")
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        pil = _open(path, str(path))
    else:
        raise InputError(f"unsupported image type {type(image).__name__}: give a path, bytes, PIL image or numpy array")
    width, height = pil.size
    if width < 1 or height < 1:
        raise InputError(f"the image is empty ({width}x{height})")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InputError(f"the image is {width}x{height}: aspect ratio {max(width, height) / min(width, height):.0f}:1 "
                         f"exceeds {MAX_ASPECT_RATIO:.0f}:1")
    if not isinstance(image, np.ndarray):
        pil = _upright(pil)
    return to_rgb(pil)


def _upright(pil: Image.Image) -> Image.Image:
    """The image as its EXIF orientation says it is seen (transformers' ``load_image`` applies ``exif_transpose``
    too; a phone photo with orientation 6 would otherwise reach the model on its side)."""
    from PIL import ImageOps

    try:
        orientation = pil.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: the pixels as stored, like an image without one
        return pil
    if orientation in (None, 1):
        return pil
    try:
        return ImageOps.exif_transpose(pil)
    except Exception as exc:
        raise InputError(f"cannot apply the image's EXIF orientation {orientation}: {exc}") from exc


def check_geometry(width: int, height: int, config: PreprocessConfig, name: str = "image") -> None:
    """Refuse, before allocating anything, an image whose pad or resize would be enormous (one line)."""
    if width < 1 or height < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InputError(f"{name} is {width}x{height}: empty, or an aspect ratio over {MAX_ASPECT_RATIO:.0f}:1")
    if config.pad_to_square:
        width = height = max(width, height)
        if width * height > MAX_STEP_PIXELS:
            raise InputError(f"{name} padded to a square would be {width}x{height} pixels (over {MAX_STEP_PIXELS} pixels)")
    if config.resize_shortest_edge is not None:
        short, long = min(width, height), max(width, height)
        new_long = int(config.resize_shortest_edge * long / short)
        if config.resize_shortest_edge * new_long > MAX_STEP_PIXELS:
            raise InputError(f"{name} is {width}x{height}: resized to a shortest edge of {config.resize_shortest_edge} it "
                             f"would be {new_long} pixels long (over {MAX_STEP_PIXELS} pixels)")


def to_rgb(pil: Image.Image) -> Image.Image:
    """RGB as transformers' ``convert_to_rgb`` makes it: every other mode through RGBA composited on white, so
    transparent areas become white (a plain ``convert("RGB")`` would make them black)."""
    if pil.mode == "RGB":
        return pil
    rgba = pil.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, "WHITE")
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _open(source: Any, name: str) -> Image.Image:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over PIL's pixel limit: refuse, do not warn
            pil = Image.open(source)
            pil.load()  # decode now, so a truncated file fails here with its name
        return pil
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image {name} is too large to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as exc:
        raise InputError(f"cannot decode image {name}: {exc}") from exc


def _pad_to_square(pil: Image.Image, mean: Sequence[float]) -> Image.Image:
    width, height = pil.size
    if width == height:
        return pil
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(pil, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_image(image: ImageLike, config: PreprocessConfig) -> np.ndarray:
    """One image -> float32 ``[3, S, S]`` pixel values."""
    pil = load_image(image)
    check_geometry(*pil.size, config)
    if config.pad_to_square:
        pil = _pad_to_square(pil, config.image_mean)
    if config.resize_shortest_edge is not None:
        width, height = pil.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = config.resize_shortest_edge, int(config.resize_shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != pil.size:
            pil = pil.resize(size, resample=config.resample)
    array = np.asarray(pil, dtype=np.uint8)
    if config.crop_height is not None:
        array = _center_crop(array, config.crop_height, config.crop_width)
    if array.shape[0] != config.image_size or array.shape[1] != config.image_size:
        raise InputError(
            f"preprocessing produced a {array.shape[1]}x{array.shape[0]} image but the vision graph takes "
            f"{config.image_size}x{config.image_size}; the artifact's preprocessing settings are inconsistent"
        )
    pixels = array.astype(np.float32) * np.float32(config.rescale_factor)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1).copy()


def _center_crop(array: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    height, width = array.shape[:2]
    if crop_height > height or crop_width > width:  # pad with zeros first, like the processors do
        top, left = max(0, (crop_height - height) // 2), max(0, (crop_width - width) // 2)
        padded = np.zeros((max(height, crop_height), max(width, crop_width), array.shape[2]), dtype=array.dtype)
        padded[top : top + height, left : left + width] = array
        array, (height, width) = padded, padded.shape[:2]
    top, left = int((height - crop_height) / 2.0), int((width - crop_width) / 2.0)
    return array[top : top + crop_height, left : left + crop_width]


def preprocess_batch(images: Iterable[ImageLike] | ImageLike, config: PreprocessConfig) -> np.ndarray:
    """Images (one or several) -> float32 ``[B, 3, S, S]``."""
    if isinstance(images, (str, os.PathLike, bytes, Image.Image, np.ndarray)):
        images = [images]
    elif not isinstance(images, (list, tuple)):
        raise InputError(f"unsupported image type {type(images).__name__}: give a path, bytes, PIL image, numpy array or a list of them")
    batch = [preprocess_image(image, config) for image in images]
    if not batch:
        raise InputError("no images given")
    return np.stack(batch)
