"""Shared set-up for the benchmarks: a ViT-L/14-336-sized CLIP tower built from its config (random weights).

No CLIP weights are available offline, so attention sparsity is imitated: the last layer's q_proj/k_proj weights
are scaled so that CLS attention is peaked the way a trained CLIP's is (a few percent IQR outliers, 5.5% in the
paper). ``sharpen`` says what scale was used; every bench prints it.
"""

from __future__ import annotations

import statistics
import time

import torch

VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)


def vit_l_tower(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**VIT_L_336)).eval()


def sharpen(tower, scale: float) -> None:
    """Multiply the last layer's q_proj and k_proj weights by ``scale`` (logits scale by ``scale**2``)."""
    attn = tower.encoder.layers[-1].self_attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(scale)
        attn.k_proj.weight.mul_(scale)


def timed(fn, runs: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``runs`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
