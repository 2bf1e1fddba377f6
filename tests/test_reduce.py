"""The vectorised reducer against the loop reference, per image and batched, plus its defined edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prumerge.artifact.contract import EXTRA_TOKEN_INDEX, PADDING_INDEX
from prumerge.errors import ConfigError, InputError
from prumerge.reduce import (
    ReducerConfig,
    cls_attention,
    default_capacity,
    iqr_outlier_count,
    linear_quantile,
    max_outliers,
    plus_stride,
    reduce_tokens,
)
from reference import peaked_inputs, reference_prumerge

METHODS = ["prumerge", "prumerge+"]
GRIDS = [(64, 32), (49, 24), (144, 48), (576, 64)]


def valid_part(out, b=0):
    n = int(out.num_tokens[b])
    return out.tokens[b, :n], out.indices[b, : n - 1].tolist()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"P{g[0]}")
def test_matches_loop_reference_at_batch_one(method, grid):
    num_patches, width = grid
    seeds = range(40) if num_patches < 576 else range(8)
    counts = set()
    for seed in seeds:
        features, q, k = peaked_inputs(seed, num_patches, width)
        out = reduce_tokens(features, q, k, ReducerConfig(method=method))
        ref_tokens, ref_idx = reference_prumerge(features[0], q[0], k[0], plus=method == "prumerge+")
        tokens, idx = valid_part(out)
        assert idx == ref_idx, f"seed {seed}: indices differ"
        assert out.indices[0, len(idx)] == EXTRA_TOKEN_INDEX
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
        counts.add(len(idx))
    assert len(counts) > 3, "inputs should exercise several different adaptive counts"


def test_matches_reference_on_unstructured_noise():
    """Plain Gaussian q/k (no planted peaks): the outlier rule still decides, sometimes keeping few tokens."""
    for seed in range(30):
        g = torch.Generator().manual_seed(1000 + seed)
        features, q, k = (torch.randn(1, 100 + n, 40, generator=g) for n in (0, 1, 1))
        for plus in (False, True):
            out = reduce_tokens(features, q, k, ReducerConfig(method="prumerge+" if plus else "prumerge"))
            ref_tokens, ref_idx = reference_prumerge(features[0], q[0], k[0], plus=plus)
            tokens, idx = valid_part(out)
            assert idx == ref_idx
            torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_image_alone(method):
    features, q, k = peaked_inputs(7, 144, 32, batch=6)
    config = ReducerConfig(method=method)
    batched = reduce_tokens(features, q, k, config)
    assert len(set(batched.num_tokens.tolist())) > 1, "the batch should mix different counts"
    for b in range(6):
        alone = reduce_tokens(features[b : b + 1], q[b : b + 1], k[b : b + 1], config)
        assert torch.equal(batched.num_tokens[b], alone.num_tokens[0])
        assert torch.equal(batched.indices[b], alone.indices[0])
        torch.testing.assert_close(batched.tokens[b], alone.tokens[0], rtol=1e-6, atol=1e-6)


def test_quantile_and_outlier_count_match_numpy():
    g = torch.Generator().manual_seed(3)
    for n in (2, 3, 16, 49, 196, 576):
        scores = torch.rand(4, n, generator=g) ** 3
        ordered = torch.sort(scores, dim=-1).values
        for qq in (0.25, 0.75):
            expected = np.percentile(scores.numpy(), qq * 100, axis=-1)
            np.testing.assert_allclose(linear_quantile(ordered, qq).numpy(), expected, rtol=1e-6)
        counts = iqr_outlier_count(scores, 1.5)
        for b in range(4):
            a = scores[b].numpy()
            q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
            assert counts[b] == int(np.sum(a > q3 + 1.5 * (q3 - q1)))
        assert counts.dtype == torch.int64


def test_iqr_factor_is_configurable():
    features, q, k = peaked_inputs(11, 144, 32)
    scores = cls_attention(q, k)
    loose, strict = iqr_outlier_count(scores, 0.0), iqr_outlier_count(scores, 3.0)
    assert loose > strict
    out = reduce_tokens(features, q, k, ReducerConfig(iqr_factor=0.0))
    _, ref_idx = reference_prumerge(features[0], q[0], k[0], iqr_factor=0.0)
    assert valid_part(out)[1] == ref_idx


def test_per_head_attention_is_mean_of_head_softmaxes():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 17, 32, generator=g), torch.randn(2, 17, 32, generator=g)
    got = cls_attention(q, k, num_heads=4, mode="per_head")
    heads = []
    for h in range(4):
        sl = slice(8 * h, 8 * h + 8)
        heads.append(torch.softmax(q[:, :1, sl] @ k[:, :, sl].transpose(1, 2) / 8**0.5, -1)[:, 0, 1:])
    torch.testing.assert_close(got, torch.stack(heads).mean(0))
    full = cls_attention(q, k)
    torch.testing.assert_close(full, torch.softmax(q[:, :1] @ k.transpose(1, 2) / 32**0.5, -1)[:, 0, 1:])


@pytest.mark.parametrize("options", [dict(neighbors=0), dict(neighbors=5), dict(merge_weights="normalized"),
                                     dict(merge_weights="normalized", neighbors=3)], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_options_off_their_defaults_match_the_loop_reference(method, options):
    """neighbors=0 (no merge: kept tokens as they are), few neighbours, and normalized weights (the kept token
    weighted by its own attention in the mean) against the loop reference."""
    for seed in range(6):
        features, q, k = peaked_inputs(seed, 64, 32)
        out = reduce_tokens(features, q, k, ReducerConfig(method=method, **options))
        ref_tokens, ref_idx = reference_prumerge(features[0], q[0], k[0], plus=method == "prumerge+",
                                                 neighbors=options.get("neighbors", 32),
                                                 normalized=options.get("merge_weights") == "normalized")
        tokens, idx = valid_part(out)
        assert idx == ref_idx
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)


def test_spatial_order_and_normalized_weights_are_options():
    features, q, k = peaked_inputs(2, 64, 32)
    official = reduce_tokens(features, q, k, ReducerConfig(method="prumerge+"))
    spatial = reduce_tokens(features, q, k, ReducerConfig(method="prumerge+", order="spatial"))
    n = int(official.num_tokens[0]) - 1
    assert sorted(official.indices[0, :n].tolist()) == spatial.indices[0, :n].tolist()
    # same tokens, only reordered; the extra token stays last
    perm = [official.indices[0, :n].tolist().index(i) for i in spatial.indices[0, :n].tolist()]
    torch.testing.assert_close(spatial.tokens[0, :n], official.tokens[0, perm])
    torch.testing.assert_close(spatial.tokens[0, n], official.tokens[0, n])

    normalized = reduce_tokens(features, q, k, ReducerConfig(merge_weights="normalized"))
    scores = cls_attention(q, k)[0]
    n = int(normalized.num_tokens[0]) - 1
    pruned = [j for j in range(64) if j not in normalized.indices[0, :n].tolist()]
    w = scores[pruned]
    torch.testing.assert_close(normalized.tokens[0, n], (w[:, None] * features[0, pruned]).sum(0) / w.sum())


# ---------------------------------------------------------------------------------------------- edge cases
def _even_spread(num_patches=64, width=16):
    """CLS attention spread evenly in log space: no IQR outliers at all (the official code keeps nothing)."""
    q = torch.zeros(1, num_patches + 1, width)
    k = torch.zeros(1, num_patches + 1, width)
    q[0, 0, 0] = 1.0
    k[0, 1:, 0] = torch.linspace(0.0, 0.5, num_patches) * width**0.5
    return torch.randn(1, num_patches, width), q, k


@pytest.mark.parametrize("method", METHODS)
def test_zero_outliers_keeps_the_top_patch(method):
    features, q, k = _even_spread()
    assert int(iqr_outlier_count(cls_attention(q, k))[0]) == 0
    out = reduce_tokens(features, q, k, ReducerConfig(method=method))
    assert out.indices[0, 0] == 63  # the highest-attention patch
    if method == "prumerge":
        assert out.num_tokens[0] == 2  # one kept token + the extra token
    else:
        stride = (64 // 1) // 3
        sampled = [x for x in range(0, 63, stride) if x != 63]
        assert out.indices[0, 1 : 1 + len(sampled)].tolist() == sampled
    out3 = reduce_tokens(features, q, k, ReducerConfig(method=method, min_keep=3))
    assert out3.indices[0, :3].tolist() == [63, 62, 61]


def test_plus_stride_never_zero():
    # official: int(int(576 / 200) / 3) = 0 -> torch.arange step 0 crashes
    assert plus_stride(torch.tensor([200, 144, 32, 1]), 576).tolist() == [1, 1, 6, 192]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["features", "q", "k"])
def test_non_finite_input_is_a_clear_error(bad, where):
    tensors = dict(zip(("features", "q", "k"), peaked_inputs(0, 16, 8)))
    tensors[where][0, 3, 2] = bad
    with pytest.raises(InputError, match=f"{where} contains NaN or Inf"):
        reduce_tokens(tensors["features"], tensors["q"], tensors["k"])


def test_wrong_shapes_are_clear_errors():
    features, q, k = peaked_inputs(0, 16, 8)
    with pytest.raises(InputError, match="q must be"):
        reduce_tokens(features, q[:, 1:], k)
    with pytest.raises(InputError, match="features must be"):
        reduce_tokens(features[0], q, k)
    with pytest.raises(InputError, match="widths differ"):
        reduce_tokens(features, q, k[..., :4])


def test_config_validation():
    for bad in (dict(method="fast"), dict(iqr_factor=-1), dict(neighbors=-2), dict(min_keep=0), dict(capacity=1),
                dict(order="random")):
        with pytest.raises(ConfigError):
            ReducerConfig(**bad)
    with pytest.raises(ConfigError, match="exceeds"):
        ReducerConfig(capacity=100).resolved_capacity(64)
    assert ReducerConfig.from_dict(ReducerConfig(method="prumerge+", order="spatial").to_dict()) == ReducerConfig(
        method="prumerge+", order="spatial"
    )


def test_capacity_bounds():
    assert max_outliers(576) == 144
    assert default_capacity("prumerge", 576) == 145
    assert default_capacity("prumerge+", 576) == 577
    # the bound is tight: a distribution with exactly max_outliers scores above the fence exists
    for n in (16, 49, 576):
        scores = torch.cat([torch.zeros(n - max_outliers(n)), torch.ones(max_outliers(n))]).unsqueeze(0)
        assert int(iqr_outlier_count(scores, 0.0)[0]) == max_outliers(n)


def test_capacity_truncation_keeps_highest_attention_and_is_flagged():
    features, q, k = peaked_inputs(4, 64, 32, peaks=8)
    full = reduce_tokens(features, q, k)
    n_full = int(full.num_tokens[0])
    assert n_full > 4
    small = reduce_tokens(features, q, k, ReducerConfig(capacity=4))
    assert bool(small.truncated[0]) and not bool(full.truncated[0])
    assert small.num_tokens[0] == 4
    assert small.indices[0, :3].tolist() == full.indices[0, :3].tolist()
    # dropped kept tokens flow into the extra token
    scores = cls_attention(q, k)[0]
    kept = small.indices[0, :3].tolist()
    pruned = [j for j in range(64) if j not in kept]
    torch.testing.assert_close(small.tokens[0, 3], (scores[pruned, None] * features[0, pruned]).sum(0), rtol=1e-5, atol=1e-5)


def test_dtype_roundtrip_fp16_inputs():
    features, q, k = peaked_inputs(9, 64, 32)
    out16 = reduce_tokens(features.half(), q.half(), k.half())
    assert out16.tokens.dtype == torch.float16
    out32 = reduce_tokens(features.half().float(), q.half().float(), k.half().float())
    assert torch.equal(out16.indices, out32.indices)


# ------------------------------------------------------------------------------------------ properties
@st.composite
def reducer_case(draw):
    num_patches = draw(st.sampled_from([4, 9, 16, 36, 64, 100]))
    width = draw(st.sampled_from([4, 8, 16]))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    method = draw(st.sampled_from(METHODS))
    spread = draw(st.sampled_from([0.1, 1.0, 3.0]))
    features, q, k = peaked_inputs(seed, num_patches, width, batch=batch, spread=spread)
    return features, q, k, method


@settings(max_examples=60, deadline=None)
@given(reducer_case())
def test_contract_properties(case):
    features, q, k, method = case
    batch, num_patches, _ = features.shape
    config = ReducerConfig(method=method)
    out = reduce_tokens(features, q, k, config)
    capacity = config.resolved_capacity(num_patches)
    assert out.tokens.shape == (batch, capacity, features.shape[-1])
    assert out.indices.shape == (batch, capacity) and out.num_tokens.shape == (batch,)
    assert out.num_tokens.dtype == torch.int64 and out.indices.dtype == torch.int64
    for b in range(batch):
        n = int(out.num_tokens[b])
        assert 2 <= n <= capacity
        kept = out.indices[b, : n - 1].tolist()
        assert len(set(kept)) == len(kept) and all(0 <= i < num_patches for i in kept)
        assert out.indices[b, n - 1] == EXTRA_TOKEN_INDEX
        assert (out.indices[b, n:] == PADDING_INDEX).all()
        assert (out.tokens[b, n:] == 0).all()
        if method == "prumerge":
            assert n - 1 <= max(max_outliers(num_patches), 1)
    assert not out.truncated.any()


@settings(max_examples=30, deadline=None)
@given(reducer_case(), st.integers(0, 2**31 - 1))
def test_patch_permutation_equivariance(case, seed):
    """PruMerge does not depend on raster order: permuting patches permutes the kept indices, tokens unchanged."""
    features, q, k, _ = case
    num_patches = features.shape[1]
    perm = torch.randperm(num_patches, generator=torch.Generator().manual_seed(seed))
    kperm = torch.cat([torch.zeros(1, dtype=torch.long), perm + 1])
    base = reduce_tokens(features, q, k)
    moved = reduce_tokens(features[:, perm], q[:, kperm], k[:, kperm])
    assert torch.equal(base.num_tokens, moved.num_tokens)
    for b in range(features.shape[0]):
        n = int(base.num_tokens[b])
        assert perm[moved.indices[b, : n - 1]].tolist() == base.indices[b, : n - 1].tolist()
        torch.testing.assert_close(moved.tokens[b, :n], base.tokens[b, :n], rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(reducer_case(), st.integers(0, 2**31 - 1))
def test_batch_permutation(case, seed):
    features, q, k, method = case
    perm = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
    config = ReducerConfig(method=method)
    base = reduce_tokens(features, q, k, config)
    moved = reduce_tokens(features[perm], q[perm], k[perm], config)
    assert torch.equal(moved.indices, base.indices[perm])
    torch.testing.assert_close(moved.tokens, base.tokens[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash bench/gpu_check.sh runs it there)")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("graph_form", [False, True], ids=["eager", "graph-form"])
def test_reducer_on_cuda_matches_cpu(method, graph_form, monkeypatch):  # pragma: no cover - needs a GPU
    """The same inputs on CUDA and on the CPU: counts and indices identical (CUDA's sort/TopK/cumsum obey the
    same tie rule), tokens within fp32 GEMM rounding. ``graph_form``: the static-capacity path the exported graph
    runs (TopK, every slot merged)."""
    import prumerge.reduce.ranking as ranking
    import prumerge.reduce.reducer as reducer

    if graph_form:
        monkeypatch.setattr(ranking, "tracing", lambda: True)
        monkeypatch.setattr(reducer, "tracing", lambda: True)
    features, q, k = peaked_inputs(11, 576, 64, batch=6)
    features[1, 40] = features[1, 41]  # an exact tie in the neighbour boundary's neighbourhood
    k[1, 41] = k[1, 42]
    config = ReducerConfig(method=method)
    cpu = reduce_tokens(features, q, k, config)
    gpu = reduce_tokens(features.cuda(), q.cuda(), k.cuda(), config)
    assert torch.equal(cpu.num_tokens, gpu.num_tokens.cpu())
    assert torch.equal(cpu.indices, gpu.indices.cpu())
    torch.testing.assert_close(gpu.tokens.cpu(), cpu.tokens, rtol=1e-5, atol=1e-5)
