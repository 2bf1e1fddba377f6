"""The one comparator of two runs of the token contract (``VisionOutput``): an exported graph against the PyTorch
encoder it came from (build validation, ``verify``), and a quantised graph against its float one (INT8 agreement).

Validation: token counts and indices must be identical (selection is discrete: any difference is a bug, not
noise); features must agree within a tolerance that depends on precision. Agreement: how much of the selection a
quantised graph keeps (kept-set Jaccard, identical selections, cosine of the tokens both kept), reported, not
required.
"""

from __future__ import annotations



import numpy as np

from ..artifact.agreement import agreement  # noqa: F401  (validation reports it; the contract owns it)
from ..artifact.contract import ADAPTIVE_METHODS, VisionOutput
from ..artifact.manifest import SelectionAgreement, ValidationSection
from ..errors import ValidationError

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}

# A merged token over tolerance is explained when the reference's own neighbour boundary is a near-tie: its n-th and
# (n+1)-th key-cosine similarities differ by less than this, so float error between two runtimes may swap which
# patch is merged. Derived from the measured cosine error between onnxruntime and PyTorch on the real DINOv2-S
# and real photos (`python bench/bench_near_ties.py`, 28 photos x 256 patches, every pair): max |delta cos|
# 1.9e-6 in fp32 and 6.6e-4 in fp16 (keys in half precision); epsilon = 10x that, rounded up.
NEAR_TIE_EPSILON = {"fp32": 2e-5, "fp16": 1e-2}

# Selection is held exact in fp32: measured on the real DINOv2-S and 28 photos, onnxruntime and PyTorch pick the same
# tokens, and on an H200 so does CUDA with TF32 off. In fp16 it is not portable: two fp16 runtimes differ in the
# attention scores by up to 1.6e-2 relative (`bench/bench_near_ties.py`, onnxruntime vs PyTorch, the patches at
# least half the threshold, and the threshold itself), enough to move an image whose threshold has a patch that
# close (on an H200, 6 of 28 photos moved, each with a patch within 1e-3..8e-3 of its threshold). So in fp16 an
# image whose selection differs passes when that selection is one the reference's own scores allow under a
# relative perturbation of SELECTION_EPSILON (2x the measured error): see ``selection_within``.
SELECTION_EPSILON = {"fp32": 0.0, "fp16": 3e-2}
# In fp32 the kept *set* and count stay exact, but the order among kept patches whose reference scores tie within
# the measured fp32 score error (2.4e-5 relative, onnxruntime vs PyTorch, `bench/bench_near_ties.py`) may differ:
# the real DINOv2-S at its 518 px config (1369 patches) swapped two such patches. Allowed within 2x that error.
ORDER_EPSILON_FP32 = 5e-5


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


def reference_output(reduced) -> VisionOutput:
    """A PyTorch :class:`ReducedTokens` as the token contract every comparison takes (tokens in fp32)."""
    return VisionOutput(reduced.tokens.float().numpy(), reduced.num_tokens.numpy().astype(np.int64),
                        reduced.indices.numpy().astype(np.int64), reduced.truncated.numpy().astype(bool))


def _plus_samples(kept, num_patches: int) -> list:
    """PruMerge+'s raster samples for ``len(kept)`` kept patches (``reduce.selection``'s rule, in numpy)."""
    stride = max(int(int(num_patches / len(kept)) / 3), 1)
    taken = set(int(k) for k in kept)
    return [p for p in range(0, num_patches - 1, stride) if p not in taken]


def selection_within(scores, threshold: float, selected, plus: bool, min_keep: int, epsilon: float) -> bool:
    """Whether ``selected`` (one image's kept patch indices in the official order: kept ones by descending
    attention, then PruMerge+'s raster samples) is a selection the reference ``scores [P]`` and IQR ``threshold``
    allow when every score and the threshold may move by ``epsilon`` relative: the kept set is a top-k set, ``k`` a
    possible outlier count, and the kept order descending up to that perturbation. PruMerge+'s samples must be
    exactly those of that ``k``."""
    scores = np.asarray(scores, dtype=np.float64)
    selected = [int(i) for i in selected]
    num_patches = len(scores)
    low, high = 1.0 - epsilon, 1.0 + epsilon
    splits = range(1, len(selected) + 1) if plus else [len(selected)]
    for k in splits:
        kept = selected[:k]
        if plus and selected[k:] != _plus_samples(kept, num_patches):
            continue
        if not kept or len(set(kept)) != len(kept):
            continue
        others = np.ones(num_patches, dtype=bool)
        others[kept] = False
        kept_scores = scores[kept]
        lowest, highest_other = kept_scores.min(), scores[others].max(initial=-np.inf)
        if lowest * high < highest_other * low:  # not a top-k set even with the perturbation
            continue
        if k > min_keep and lowest * high <= threshold * low:  # the k-th could not be an outlier
            continue
        if highest_other * low > threshold * high:  # the (k+1)-th would still be an outlier
            continue
        later_max = np.maximum.accumulate(kept_scores[::-1])[::-1]  # largest score at or after each position
        if np.any(kept_scores * high < later_max * low):  # an order inversion larger than the perturbation
            continue
        return True
    return False


def compare_outputs(reference: VisionOutput, candidate: VisionOutput, tolerance: float, provider: str, gaps=None,
                    epsilon: float = 0.0, selection=None, tied=None) -> ValidationResult:
    """``candidate`` against ``reference`` token by token; candidate may be trimmed (dynamic contract).

    ``gaps [B, C]``: the reference's neighbour-boundary similarity gap per slot (``PruMergeEncoder.neighbor_gaps``);
    without it no token over tolerance is explained. ``selection``: ``dict(scores [B, P], thresholds [B], plus,
    min_keep, epsilon)`` from the reference (reduced precision only): an image whose selection differs is then
    checked with :func:`selection_within`, and its tokens are compared patch by patch where both kept the patch
    (a kept patch's merged token does not depend on which others were kept; the extra token does, so it is not
    compared there). Without it any selection difference fails. ``tied [B]``: for a fixed-count method whose
    greedy choice can tie (``ReducerSpec.near_ties``), whether each image's candidate set is one the reference may
    have taken up to float error; such an image's tokens are compared where both kept the patch.
    """
    counts = bool(np.array_equal(reference.num_tokens, candidate.num_tokens))
    width = candidate.tokens.shape[1]
    indices = counts and bool(np.array_equal(reference.indices[:, :width], candidate.indices))
    found = dict(tokens=0, tokens_exact=0, near_ties=0, unexplained=0, worst_unexplained=0.0, worst_explained=0.0,
                 selection_moved=0, selection_unexplained=0)
    max_error = 0.0
    for b in range(len(reference.num_tokens)):
        n_ref, n_got = int(reference.num_tokens[b]), int(candidate.num_tokens[b])
        ref_idx, got_idx = reference.indices[b, :n_ref], candidate.indices[b, :n_got]
        if n_ref == n_got and np.array_equal(ref_idx, got_idx):
            rows, got_rows = np.arange(n_ref), np.arange(n_ref)
        elif selection is not None and selection["epsilon"] > 0 and (
                not selection.get("same_set") or (n_ref == n_got and sorted(ref_idx.tolist()) == sorted(got_idx.tolist()))
        ) and selection_within(selection["scores"][b], float(selection["thresholds"][b]), got_idx[:-1], selection["plus"],
                               selection["min_keep"], selection["epsilon"]):
            found["selection_moved"] += 1
            rows, got_rows = _shared_rows(ref_idx[:-1], got_idx[:-1])  # the extra token depends on what was kept
        elif tied is not None and tied[b] and n_ref == n_got:
            found["selection_moved"] += 1
            rows, got_rows = _shared_rows(ref_idx, got_idx)
        else:
            found["selection_unexplained"] += 1
            continue
        diff = np.abs(reference.tokens[b, rows].astype(np.float64) - candidate.tokens[b, got_rows].astype(np.float64))
        per_token = diff.reshape(len(rows), -1).max(axis=1, initial=0.0)
        max_error = max(max_error, float(per_token.max(initial=0.0)))
        over = per_token > tolerance
        tie = np.zeros(len(rows), dtype=bool) if gaps is None else np.asarray(gaps[b])[rows] < epsilon
        found["tokens"] += len(rows)
        found["tokens_exact"] += int((~over).sum())
        found["near_ties"] += int((over & tie).sum())
        found["unexplained"] += int((over & ~tie).sum())
        found["worst_explained"] = max(found["worst_explained"], float(per_token[over & tie].max(initial=0.0)))
        found["worst_unexplained"] = max(found["worst_unexplained"], float(per_token[over & ~tie].max(initial=0.0)))
    if found["selection_unexplained"]:
        max_error = float("inf")
    return ValidationResult(images=len(reference.num_tokens), counts_identical=counts, indices_identical=indices,
                            max_abs_error=max_error, tolerance=tolerance, provider=provider, near_tie_epsilon=epsilon,
                            selection_epsilon=0.0 if selection is None else float(selection["epsilon"]), **found)


def _shared_rows(ref_idx, got_idx) -> tuple[np.ndarray, np.ndarray]:
    """Slots of the reference and of the candidate that hold the same patch (a moved selection's comparable tokens)."""
    where = {int(p): i for i, p in enumerate(got_idx)}
    rows = np.array([i for i, p in enumerate(ref_idx) if int(p) in where], dtype=int)
    return rows, np.array([where[int(ref_idx[i])] for i in rows], dtype=int)


def require(result: ValidationResult, what: str) -> ValidationResult:
    if result.selection_unexplained or (not result.selection_moved and not (result.counts_identical and result.indices_identical)):
        moved = f" ({result.selection_moved} more moved within the selection rule)" if result.selection_moved else ""
        if not result.counts_identical:
            raise ValidationError(f"{what}: token counts differ from the PyTorch reference on "
                                  f"{result.selection_unexplained or 'some'} image(s){moved}")
        raise ValidationError(f"{what}: kept-token indices differ from the PyTorch reference on "
                              f"{result.selection_unexplained or 'some'} image(s){moved}")
    if result.unexplained:
        raise ValidationError(
            f"{what}: {result.unexplained} token(s) differ from the PyTorch reference by up to {result.worst_unexplained:.3g} "
            f"(tolerance {result.tolerance:g}) with no near-tie at their neighbour boundary ({result.summary()})"
        )
    return result


def selection_rule(reducer, scores, thresholds, precision: str) -> dict | None:
    """The ``selection`` argument of :func:`compare_outputs` for ``precision``: the reference's ``scores [B, P]`` and
    ``thresholds [B]`` (``PruMergeEncoder.selection_scores``) with the reducer's facts; None where selection is held
    the rule does not apply (no reduction; a non-official order, whose kept part cannot be told from PruMerge+'s
    samples). In fp32 the kept set must be identical and only the order of near-tied kept patches may differ."""
    if reducer.method.value not in ADAPTIVE_METHODS or reducer.order.value != "official":  # others: exact
        return None
    same_set = SELECTION_EPSILON[precision] <= 0  # fp32: the kept set exact, only near-tied order may differ
    return dict(scores=np.asarray(scores, dtype=np.float64), thresholds=np.asarray(thresholds, dtype=np.float64),
                plus=reducer.method.value == "prumerge+", min_keep=reducer.min_keep, same_set=same_set,
                epsilon=ORDER_EPSILON_FP32 if same_set else SELECTION_EPSILON[precision])


def validate_against(encoder, got: VisionOutput, pixels, precision: str, provider: str,
                     question: dict | None = None) -> ValidationResult:
    """Compare runtime outputs ``got`` for ``pixels`` (and ``question``, for a graph that reads one) with
    ``encoder`` (PyTorch), near-ties explained."""
    import torch

    extra = {name: torch.from_numpy(array) for name, array in (question or {}).items()}
    with torch.no_grad():
        sink: list = []
        ref = encoder(torch.from_numpy(pixels), tower_sink=sink, **extra)  # one tower pass: reference, keys, scores
        q, k = sink[0]
        gaps = selection = None
        if encoder.reducer.method.adaptive:  # PruMerge's neighbour boundaries and IQR selection
            gaps = encoder.neighbor_gaps(None, ref.indices, keys=k).numpy()
            scores, thresholds = encoder.selection_scores(q, k)
            selection = selection_rule(encoder.reducer, scores.numpy(), thresholds.numpy(), precision)
        tied = None
        spec = encoder.reducer.spec
        if spec.near_ties is not None and not np.array_equal(ref.indices.numpy(), got.indices[:, :ref.indices.shape[1]]):
            hidden, _, _ = encoder.tower_outputs(torch.from_numpy(pixels))
            patches = hidden[:, encoder.adapter.prefix_tokens:]
            features = encoder.projector(patches) if spec.projected and encoder.projector is not None else patches
            tied = spec.near_ties(features, *(extra[name] for name in spec.inputs), encoder.reducer, got.indices,
                                  **encoder.relevance_inputs(patches))
    return compare_outputs(reference_output(ref), got, TOLERANCE[precision], provider, gaps=gaps,
                           epsilon=NEAR_TIE_EPSILON[precision], selection=selection, tied=tied)
