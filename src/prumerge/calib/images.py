"""Calibration image sets: a folder of photos (broken files skipped and reported) or generated images.

Order is deterministic (sorted relative paths) and sampling is seeded, so a calibration file can name its set and
``build`` can read back exactly the same images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import InputError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclasses.dataclass
class CalibrationSet:
    images: list  # PIL images, RGB
    names: list
    skipped: list  # [{"file", "reason"}]
    source: dict  # how to rebuild the set: {"folder", "limit", "seed"} or {"synthetic", "seed"}

    @classmethod
    def from_folder(cls, folder: str | Path, limit: int | None = None, seed: int = 0) -> "CalibrationSet":
        from ..runtime.preprocess import load_image

        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"calibration folder not found: {folder}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if limit is not None:
            if limit < 1:
                raise InputError(f"limit must be >= 1, got {limit}")
            if limit < len(files):
                picked = np.random.default_rng(seed).permutation(len(files))[:limit]
                files = [files[i] for i in sorted(picked)]
        images, names, skipped = [], [], []
        for path in files:
            try:
                images.append(load_image(path))
                names.append(str(path.relative_to(folder)))
            except InputError as exc:
                skipped.append({"file": str(path.relative_to(folder)), "reason": str(exc)})
        if not images:
            raise InputError(f"no readable images in {folder} ({len(skipped)} broken, extensions: {', '.join(sorted(EXTENSIONS))})")
        return cls(images, names, skipped, {"folder": str(folder.resolve()), "limit": limit, "seed": seed})

    @classmethod
    def synthetic(cls, count: int, seed: int = 0) -> "CalibrationSet":
        from ..samples import synthetic_images

        images = synthetic_images(count, seed=seed)
        return cls(images, [f"synthetic-{i}" for i in range(count)], [], {"synthetic": count, "seed": seed})

    def pixels(self, config):
        """The set preprocessed as the artifact's ``PreprocessConfig`` says (what the graph sees)."""
        from ..runtime.preprocess import preprocess_batch

        return preprocess_batch(self.images, config)

    @classmethod
    def from_source(cls, source: dict) -> "CalibrationSet":
        if "folder" in source:
            return cls.from_folder(source["folder"], source.get("limit"), source.get("seed", 0))
        return cls.synthetic(source["synthetic"], source.get("seed", 0))
