"""Compare an exported vision graph on onnxruntime with the PyTorch encoder it came from.

Token counts and indices must be identical (selection is discrete: any difference is a bug, not noise); features
must agree within a tolerance that depends on precision.
"""

from __future__ import annotations


import numpy as np

from ..artifact.manifest import ValidationSection
from ..errors import ValidationError

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}

# A merged token over tolerance is explained when the reference's own neighbour boundary is a near-tie: its n-th and
# (n+1)-th key-cosine similarities differ by less than this, so float error between two runtimes may swap which
# patch is merged. Derived from the measured cosine error between onnxruntime and PyTorch on the real DINOv2-S
# and real photos (`python bench/bench_near_ties.py`, 28 photos x 256 patches, every pair): max |delta cos|
# 1.9e-6 in fp32 and 6.6e-4 in fp16 (keys in half precision); epsilon = 10x that, rounded up.
NEAR_TIE_EPSILON = {"fp32": 2e-5, "fp16": 1e-2}


# the manifest's section is the result's type: one definition of what a validation records
ValidationResult = ValidationSection


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
    counts = bool(np.array_equal(reference["num_tokens"], candidate["num_tokens"]))
    width = candidate["tokens"].shape[1]
    indices = counts and bool(np.array_equal(reference["indices"][:, :width], candidate["indices"]))
    found = dict(tokens=0, tokens_exact=0, near_ties=0, unexplained=0, worst_unexplained=0.0, worst_explained=0.0)
    max_error = float("inf")
    if counts:
        max_error = 0.0
        for b, n in enumerate(reference["num_tokens"]):
            n = int(n)
            diff = np.abs(reference["tokens"][b, :n].astype(np.float64) - candidate["tokens"][b, :n].astype(np.float64))
            per_token = diff.reshape(n, -1).max(axis=1, initial=0.0)
            max_error = max(max_error, float(per_token.max(initial=0.0)))
            over = per_token > tolerance
            tie = np.zeros(n, dtype=bool) if gaps is None else np.asarray(gaps[b, :n]) < epsilon
            found["tokens"] += n
            found["tokens_exact"] += int((~over).sum())
            found["near_ties"] += int((over & tie).sum())
            found["unexplained"] += int((over & ~tie).sum())
            found["worst_explained"] = max(found["worst_explained"], float(per_token[over & tie].max(initial=0.0)))
            found["worst_unexplained"] = max(found["worst_unexplained"], float(per_token[over & ~tie].max(initial=0.0)))
    return ValidationResult(images=len(reference["num_tokens"]), counts_identical=counts, indices_identical=indices,
                            max_abs_error=max_error, tolerance=tolerance, provider=provider, near_tie_epsilon=epsilon,
                            **found)


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
        keys: list = []
        ref = encoder(torch.from_numpy(pixels), keys_sink=keys)  # one tower pass for the reference and its keys
        gaps = encoder.neighbor_gaps(None, ref.indices, keys=keys[0]).numpy() if encoder.reducer.method.value != "none" else None
    return compare_outputs(reference_arrays(ref), got, TOLERANCE[precision], provider, gaps=gaps,
                           epsilon=NEAR_TIE_EPSILON[precision])
