"""Deterministic synthetic images (shapes on gradients, varied aspect ratios): for the demo, profiling and
calibration smoke runs when no photo folder is given. numpy + PIL only, so the device side can use them."""

from __future__ import annotations


def synthetic_images(count: int = 4, size: int = 400, seed: int = 0):
    """Synthetic photos-in-spirit (shapes on gradients, varied aspect ratios) as PIL images."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        width, height = size + 80 * (i % 3), size - 40 * (i % 2)
        base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
        canvas = Image.fromarray(np.broadcast_to(base, (height, width, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(2, 7))):
            x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
            x1, y1 = x0 + int(rng.integers(30, 160)), y0 + int(rng.integers(30, 160))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
        images.append(canvas)
    return images

