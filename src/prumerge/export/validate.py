"""Compare an exported vision graph on onnxruntime with the PyTorch encoder it came from.

Token counts and indices must be identical (selection is discrete: any difference is a bug, not noise); features
must agree within a tolerance that depends on precision.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ValidationError

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}

# A merged token over tolerance is explained when the reference's own neighbour boundary is a near-tie: its n-th and
# (n+1)-th key-cosine similarities differ by less than this, so float error between two runtimes may swap which
# patch is merged. Derived from the measured cosine error between onnxruntime and PyTorch on the real DINOv2-S
# and real photos (`python bench/bench_near_ties.py`, 28 photos x 256 patches, every pair): max |delta cos|
# 1.9e-6 in fp32 and 6.6e-4 in fp16 (keys in half precision); epsilon = 10x that, rounded up.
NEAR_TIE_EPSILON = {"fp32": 2e-5, "fp16": 1e-2}


@dataclasses.dataclass
class ValidationResult:
    """Counts and indices are all-or-nothing; features are judged token by token.

    ``tokens_exact``: tokens within ``tolerance``; ``near_ties``: tokens over it whose reference neighbour boundary
    is a near-tie (gap below ``near_tie_epsilon``); ``unexplained``: the rest (any fails); ``worst_unexplained``:
    their largest error (0 when none).
    """

    images: int
    counts_identical: bool
    indices_identical: bool
    max_abs_error: float
    tolerance: float
    provider: str
    tokens: int = 0
    tokens_exact: int = 0
    near_ties: int = 0
    unexplained: int = 0
    worst_unexplained: float = 0.0
    near_tie_epsilon: float = 0.0
    worst_explained: float = 0.0

    @property
    def ok(self) -> bool:
        return self.counts_identical and self.indices_identical and self.unexplained == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ok": self.ok}

    def summary(self) -> str:
        return (f"{self.tokens} tokens on {self.images} images: {self.tokens_exact} within {self.tolerance:g}, "
                f"{self.near_ties} explained by near-ties (worst {self.worst_explained:.2g}), "
                f"{self.unexplained} unexplained (worst {self.worst_unexplained:.2g})")


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


def compare_outputs(reference: dict, candidate: dict, tolerance: float, provider: str, gaps=None,
                    epsilon: float = 0.0) -> ValidationResult:
    """Both dicts hold numpy ``tokens, num_tokens, indices``; candidate may be trimmed (dynamic contract).

    ``gaps [B, C]``: the reference's neighbour-boundary similarity gap per slot (``PruMergeEncoder.neighbor_gaps``);
    without it no token over tolerance is explained.
    """
    counts = np.array_equal(reference["num_tokens"], candidate["num_tokens"])
    width = candidate["tokens"].shape[1]
    indices = counts and np.array_equal(reference["indices"][:, :width], candidate["indices"])
    result = ValidationResult(len(reference["num_tokens"]), bool(counts), bool(indices), float("inf"), tolerance, provider,
                              near_tie_epsilon=epsilon)
    if not counts:
        return result
    result.max_abs_error = 0.0
    for b, n in enumerate(reference["num_tokens"]):
        n = int(n)
        diff = np.abs(reference["tokens"][b, :n].astype(np.float64) - candidate["tokens"][b, :n].astype(np.float64))
        per_token = diff.reshape(n, -1).max(axis=1, initial=0.0)
        result.tokens += n
        result.max_abs_error = max(result.max_abs_error, float(per_token.max(initial=0.0)))
        over = per_token > tolerance
        result.tokens_exact += int((~over).sum())
        tie = np.zeros(n, dtype=bool) if gaps is None else np.asarray(gaps[b, :n]) < epsilon
        explained = over & tie
        result.near_ties += int(explained.sum())
        result.unexplained += int((over & ~tie).sum())
        result.worst_explained = max(result.worst_explained, float(per_token[explained].max(initial=0.0)))
        result.worst_unexplained = max(result.worst_unexplained, float(per_token[over & ~tie].max(initial=0.0)))
    return result


def require(result: ValidationResult, what: str) -> ValidationResult:
    if not result.counts_identical:
        raise ValidationError(f"{what}: token counts differ from the PyTorch reference")
    if not result.indices_identical:
        raise ValidationError(f"{what}: kept-token indices differ from the PyTorch reference")
    if result.unexplained:
        raise ValidationError(
            f"{what}: {result.unexplained} token(s) differ from the PyTorch reference by up to {result.worst_unexplained:.3g} "
            f"(tolerance {result.tolerance:g}) with no near-tie at their neighbour boundary ({result.summary()})"
        )
    return result


def validate_against(encoder, got: dict, pixels, precision: str, provider: str) -> ValidationResult:
    """Compare runtime outputs ``got`` (numpy dict) for ``pixels`` with ``encoder`` (PyTorch), near-ties explained."""
    import torch

    with torch.no_grad():
        feed = torch.from_numpy(pixels)
        ref = encoder(feed)
        gaps = encoder.neighbor_gaps(feed, ref.indices).numpy() if encoder.reducer.method.value != "none" else None
    return compare_outputs(reference_arrays(ref), got, TOLERANCE[precision], provider, gaps=gaps,
                           epsilon=NEAR_TIE_EPSILON[precision])
