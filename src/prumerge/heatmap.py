"""``prumerge.heatmap.render``: a picture of what a reducer kept, sampled and merged for one image.

Left: the model's view of the image (after its preprocessing) with the patch grid and a heat map of CLS attention
(DivPrune, which reads no attention: each patch's cosine distance to the nearest chosen token).
Right: kept patches outlined in red (rank by attention printed for the first ten), PruMerge+ samples / VisionZip's
contextual targets in cyan, each other patch tinted with the colour of the token it was merged into, and patches
that only reach the LLM through the extra token (DivPrune: that are dropped) in grey. Drawn with PIL alone.
"""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import ConfigError

KEPT = (230, 30, 30)
SAMPLED = (0, 220, 230)
EXTRA_ONLY = (70, 70, 70)
SCALE = 2
LEGEND = 56


@dataclasses.dataclass
class InspectResult:
    path: Path | None
    method: str
    num_patches: int
    grid: int
    kept: list
    sampled: list
    num_tokens: int  # what the reducer returned (kept + sampled + extra token)
    reducer_indices: list  # indices output of the reducer itself, for cross-checking
    outliers: int
    pruned_only_in_extra: list
    size: tuple

    def summary(self) -> str:
        """What ``inspect`` prints: the method's own summary lines (its registry spec's ``summary``)."""
        from .reduce.registry import get

        return get(self.method).summary.format(
            method=self.method, kept=len(self.kept), sampled=len(self.sampled), tokens=self.num_tokens,
            patches=self.num_patches, outliers=self.outliers, extra_only=len(self.pruned_only_in_extra),
            kept_list=self.kept)


def _heat(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 on a dark-blue -> yellow ramp (a perceptual-ish map without matplotlib)."""
    v = np.clip(values, 0, 1)[..., None]
    low, mid, high = np.array([20, 20, 90.0]), np.array([200, 40, 120.0]), np.array([255, 230, 50.0])
    return np.where(v < 0.5, low + (mid - low) * (v * 2), mid + (high - mid) * (v * 2 - 1)).astype(np.uint8)


def _palette(n: int) -> list:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618) % 1.0, 0.75, 1.0)) for i in range(max(n, 1))]


def render(image, model: str | Path | None = None, method: str = "prumerge", out: str | Path | None = None,
           image_size: int | None = None, encoder=None, question: dict | None = None, **reducer_options) -> InspectResult:
    """Run the reducer on ``image`` with ``model`` (checkpoint dir or hub id) or a ready ``encoder`` (an
    artifact's: ``prumerge.export.reference.artifact_encoder``) and draw it. ``question``: the arrays a reducer
    that reads the question takes (``Pipeline.question``)."""
    import torch

    from .model.encoder import PruMergeEncoder
    from .reduce.config import Method
    from .reduce.explain import explain
    from .reduce.registry import specs
    from .runtime.preprocess import preprocess_image

    spec = Method.parse(method).spec
    if spec.explain is None:
        reducing = ", ".join(name for name, s in specs().items() if s.explain is not None)
        raise ConfigError(f"inspect shows a reduction: choose method {reducing}")
    projected = spec.projected  # chooses among projected tokens: the projector is needed
    if encoder is None:
        encoder = PruMergeEncoder.from_pretrained(model, method=method, project=projected, image_size=image_size,
                                                  **reducer_options)
    config = encoder.preprocess_config()
    pixels = torch.from_numpy(preprocess_image(image, config)).unsqueeze(0)
    if spec.inputs and not question:
        raise ConfigError(f"{spec.name} keeps what the question asks for: give the question (inspect --question)")
    inputs = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in (question or {}).items()}
    with torch.no_grad():
        hidden, q, k = encoder.tower_outputs(pixels)
        prefix = encoder.adapter.prefix_tokens
        features = hidden[:, prefix:]
        if projected and encoder.projector is not None:
            features = encoder.projector(features)
        info = explain(features, q, k, encoder.reducer, num_heads=encoder.num_heads, prefix=prefix,
                       importance=encoder.adapter.importance, **inputs, **encoder.relevance_inputs(hidden[:, prefix:]))
        reduced = encoder(pixels, **inputs)
    num_tokens = int(reduced.num_tokens[0])
    reducer_indices = [p for p in reduced.indices[0, :num_tokens].tolist() if p >= 0]  # patches (no extra/CLS/merged)

    size = encoder.image_size
    grid, patch = encoder.grid, encoder.patch_size
    view = pixels[0].numpy().transpose(1, 2, 0) * np.asarray(config.image_std) + np.asarray(config.image_mean)
    view = np.clip(view / config.rescale_factor if config.rescale_factor else view, 0, 255).astype(np.uint8)
    base = Image.fromarray(view).resize((size * SCALE, size * SCALE), Image.Resampling.NEAREST)
    cell = patch * SCALE

    scores = np.clip(np.asarray(info.scores), 0, None).reshape(grid, grid)  # DivPrune: 1 - cos may be -1e-7
    heat = _heat(np.sqrt(scores / scores.max()) if scores.max() > 0 else scores)  # sqrt: one peak must not hide the rest
    heat_img = Image.fromarray(heat).resize(base.size, Image.Resampling.NEAREST)
    left = Image.blend(base, heat_img, 0.55)
    right = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.45)
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    tint_draw = ImageDraw.Draw(tint)
    colours = dict(zip(info.kept + info.sampled, _palette(len(info.kept) + len(info.sampled))))
    owner = {}
    for token in info.kept + info.sampled:  # first (highest-ranked) selected token that took the patch
        for p in info.neighbors.get(token, []):
            owner.setdefault(p, token)
    selected = set(info.kept) | set(info.sampled)
    for p in range(grid * grid):
        if p in selected:
            continue
        box = _box(p, grid, cell)
        colour = colours[owner[p]] if p in owner else EXTRA_ONLY
        tint_draw.rectangle(box, fill=(*colour, 110 if p in owner else 170))
    right = Image.alpha_composite(right.convert("RGBA"), tint).convert("RGB")
    draw_r, draw_l = ImageDraw.Draw(right), ImageDraw.Draw(left)
    for draw in (draw_l, draw_r):
        for i in range(1, grid):
            draw.line([(i * cell, 0), (i * cell, size * SCALE)], fill=(255, 255, 255), width=1)
            draw.line([(0, i * cell), (size * SCALE, i * cell)], fill=(255, 255, 255), width=1)
    for rank, p in enumerate(info.kept):
        draw_r.rectangle(_box(p, grid, cell), outline=KEPT, width=max(2, SCALE + 1))
        if rank < 10 and spec.ranked:  # only PruMerge's kept order is a ranking
            x0, y0, _, _ = _box(p, grid, cell)
            draw_r.text((x0 + 2, y0 + 1), str(rank + 1), fill=(255, 255, 255))
    for p in info.sampled:
        draw_r.rectangle(_box(p, grid, cell), outline=SAMPLED, width=max(2, SCALE))

    canvas = Image.new("RGB", (base.width * 2, base.height + LEGEND), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (base.width, 0))
    legend = ImageDraw.Draw(canvas)
    y = base.height + 6
    heat_label, line, tint_label = spec.legend
    legend.text((8, y), f"{heat_label} ({grid}x{grid} patches)", fill=(0, 0, 0))
    legend.text((base.width + 8, y), line.format(method=method, kept=len(info.kept), sampled=len(info.sampled),
                                                 tokens=num_tokens, patches=grid * grid), fill=(0, 0, 0))
    legend.text((base.width + 8, y + 18), tint_label, fill=(0, 0, 0))
    path = None
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
    return InspectResult(path, method, grid * grid, grid, info.kept, info.sampled, num_tokens, reducer_indices,
                         info.outliers, info.pruned_only_in_extra, canvas.size)


def _box(patch: int, grid: int, cell: int) -> tuple:
    row, col = divmod(patch, grid)
    return (col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1)
