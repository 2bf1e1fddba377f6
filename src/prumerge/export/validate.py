"""Compare an exported vision graph on onnxruntime with the PyTorch encoder it came from.

Token counts and indices must be identical (selection is discrete: any difference is a bug, not noise); features
must agree within a tolerance that depends on precision.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ValidationError

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}


@dataclasses.dataclass
class ValidationResult:
    images: int
    counts_identical: bool
    indices_identical: bool
    max_abs_error: float
    tolerance: float
    provider: str

    @property
    def ok(self) -> bool:
        return self.counts_identical and self.indices_identical and self.max_abs_error <= self.tolerance

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ok": self.ok}


def synthetic_pixels(count: int, image_size: int, seed: int = 0) -> np.ndarray:
    """Deterministic test images in normalised pixel space: smooth blobs plus noise, so attention varies."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    images = []
    for _ in range(count):
        img = rng.normal(0, 0.5, (3, image_size, image_size))
        for _ in range(rng.integers(1, 5)):
            cy, cx, r = rng.random(), rng.random(), 0.05 + 0.2 * rng.random()
            img += rng.normal(0, 2, (3, 1, 1)) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        images.append(img)
    return np.stack(images).astype(np.float32)


def reference_arrays(reduced) -> dict:
    """A PyTorch :class:`ReducedTokens` as the numpy dict the comparisons take (tokens in fp32)."""
    return {"tokens": reduced.tokens.float().numpy(), "num_tokens": reduced.num_tokens.numpy(),
            "indices": reduced.indices.numpy()}


def compare_outputs(reference: dict, candidate: dict, tolerance: float, provider: str) -> ValidationResult:
    """Both dicts hold numpy ``tokens, num_tokens, indices``; candidate may be trimmed (dynamic contract)."""
    counts = np.array_equal(reference["num_tokens"], candidate["num_tokens"])
    width = candidate["tokens"].shape[1]
    indices = counts and np.array_equal(reference["indices"][:, :width], candidate["indices"])
    error = float("inf")
    if counts:
        error = 0.0
        for b, n in enumerate(reference["num_tokens"]):
            diff = np.abs(reference["tokens"][b, :n].astype(np.float64) - candidate["tokens"][b, :n].astype(np.float64))
            error = max(error, float(diff.max(initial=0.0)))
    return ValidationResult(len(reference["num_tokens"]), bool(counts), bool(indices), error, tolerance, provider)


def require(result: ValidationResult, what: str) -> ValidationResult:
    if not result.counts_identical:
        raise ValidationError(f"{what}: token counts differ from the PyTorch reference")
    if not result.indices_identical:
        raise ValidationError(f"{what}: kept-token indices differ from the PyTorch reference")
    if result.max_abs_error > result.tolerance:
        raise ValidationError(
            f"{what}: features differ from the PyTorch reference by {result.max_abs_error:.3g} (tolerance {result.tolerance:g})"
        )
    return result
