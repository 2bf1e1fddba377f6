"""Reducer cost on a ViT-L/14-336-sized CLIP (576 patches), measured side by side in one run.

Prints: encoder time vs reducer time (goal: reducer <= 2% of the encoder) and the vectorised merge vs a per-token
Python loop written like the official code (goal: >= 50x faster). Random weights; attention sharpened (see
common.py). Usage: python bench/bench_reducer.py [--runs N] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import sharpen, timed, vit_l_tower
from prumerge.model.encoder import PruMergeEncoder
from prumerge.reduce import ReducerConfig, cls_attention, iqr_outlier_count, merge_tokens, reduce_tokens, select_tokens

SHARPEN = 6.0


def official_loop_merge(features, keys, cls_attn, idx):
    """The official per-token merge loop (batch 1), as published: re-concatenate 'the rest' for every kept token."""
    num_patches, width = features.shape
    compl = torch.tensor(sorted(set(range(num_patches)) - set(idx.tolist())), dtype=torch.long, device=features.device)
    x_others, x_attn = features[idx], cls_attn[idx]
    unit_others, unit_compl = F.normalize(keys[idx], dim=-1), F.normalize(keys[compl], dim=-1)
    non_topk, non_topk_attn = features[compl], cls_attn[compl]
    updated = torch.zeros_like(x_others)
    for i in range(len(idx)):
        rest_x = torch.cat([x_others[:i], x_others[i + 1:], non_topk], dim=0)
        rest_attn = torch.cat([x_attn[:i], x_attn[i + 1:], non_topk_attn], dim=0)
        rest_keys = torch.cat([unit_others[:i], unit_others[i + 1:], unit_compl], dim=0)
        sim = rest_keys @ unit_others[i]
        top = torch.topk(sim, 32).indices
        updated[i] = x_others[i] + (rest_x[top] * rest_attn[top].unsqueeze(-1)).sum(0)
    extra = (non_topk * non_topk_attn.unsqueeze(-1)).sum(0, keepdim=True)
    return torch.cat([updated, extra])


def official_stage(tower, penultimate, plus: bool):
    """The official reduction stage at batch 1, as published: q/k of every token from the last layer's own
    projections, the full 577x577 softmax, numpy quartiles, top-k, PruMerge+'s sampling loop, the per-token merge."""
    import numpy as np

    layer = tower.encoder.layers[-1]
    normed = layer.layer_norm1(penultimate)
    q, k = layer.self_attn.q_proj(normed)[0], layer.self_attn.k_proj(normed)[0]
    attn = torch.softmax(q @ k.T * q.shape[-1] ** -0.5, dim=-1)
    cls_attn = attn[0, 1:]
    scores = cls_attn.float().cpu().numpy()
    q1, q3 = np.percentile(scores, 25), np.percentile(scores, 75)
    keep = max(int(np.sum(scores > q3 + 1.5 * (q3 - q1))), 1)
    idx = torch.topk(cls_attn, keep).indices
    if plus:
        step = max(1, int(int(576 / keep) / 3))
        extra = [x for x in range(0, 575, step) if x not in idx.tolist()]
        idx = torch.cat([idx, torch.tensor(extra, dtype=torch.long, device=idx.device)])
    return official_loop_merge(penultimate[0, 1:], k[1:], cls_attn, idx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tower = vit_l_tower()
    sharpen(tower, SHARPEN)
    encoder = PruMergeEncoder(tower, ReducerConfig())
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    print(f"ViT-L/14-336 config, random weights, last-layer q/k scaled x{SHARPEN}; torch {torch.__version__}, "
          f"{args.threads} threads, batch 1, median of {args.runs} runs")
    with torch.inference_mode():
        hidden, q, k = encoder.tower_outputs(pixels)
        features = hidden[:, 1:]
        # the whole reduction stage: penultimate hidden state -> reduced tokens, q/k projections included
        last = encoder.adapter.layers[-1]
        for method in ("prumerge", "prumerge+"):
            config = ReducerConfig(method=method)

            def ours():
                q1, k1 = encoder.adapter.qk(last, hidden, query_rows=1)  # the CLS query alone; every key
                return reduce_tokens(hidden[:, 1:], q1, k1, config)

            same = int(ours().num_tokens[0]) - 1 == len(official_stage(tower, hidden, method == "prumerge+")) - 1
            t_ours = timed(ours, args.runs * 2)
            t_official = timed(lambda: official_stage(tower, hidden, method == "prumerge+"), args.runs)
            print(f"reduction stage {method:<10} {t_ours * 1e3:8.2f} ms vs the official functions {t_official * 1e3:8.2f} ms "
                  f"= {t_official / t_ours:5.1f}x (goal >= 10x for PruMerge+); same token count: {same}")
        t_encoder = timed(lambda: encoder.tower_outputs(pixels), max(2, args.runs // 2))
        print(f"encoder (23 layers + last q/k)      {t_encoder * 1e3:9.1f} ms")
        for method in ("prumerge", "prumerge+"):
            config = ReducerConfig(method=method)
            out = reduce_tokens(features, q, k, config)
            t_reduce = timed(lambda: reduce_tokens(features, q, k, config), args.runs * 4)
            print(f"reducer {method:<10} ({int(out.num_tokens[0]):3d} tokens)  {t_reduce * 1e3:9.2f} ms   "
                  f"= {100 * t_reduce / t_encoder:.2f}% of encoder (goal <= 2%)")

            scores = cls_attention(q, k)
            selection = select_tokens(scores, iqr_outlier_count(scores), config, config.resolved_capacity(576))
            n = int(selection.num_selected[0])
            idx = selection.slots[0, :n]
            exact_slots = selection.slots[:, :n]  # vectorised merge on exactly the kept tokens, like the loop
            t_vec = timed(lambda: merge_tokens(features, k[:, 1:], scores, exact_slots, selection.selected, config), args.runs * 4)
            t_loop = timed(lambda: official_loop_merge(features[0], k[0, 1:], scores[0], idx), max(2, args.runs))
            vec, _ = merge_tokens(features, k[:, 1:], scores, exact_slots, selection.selected, config)
            loop = official_loop_merge(features[0], k[0, 1:], scores[0], idx)
            err = (vec[0] - loop[:-1]).abs().max().item()
            print(f"merge {method:<10} vectorised {t_vec * 1e3:8.2f} ms vs official loop {t_loop * 1e3:8.1f} ms "
                  f"= {t_loop / t_vec:6.1f}x faster (goal >= 50x); max |diff| {err:.1e}")


if __name__ == "__main__":
    main()
