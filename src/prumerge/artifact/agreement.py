"""How much of one vision graph's token selection another keeps, from the two graphs' outputs alone (numpy).

Why here, in the contract: every comparison of two graphs of one artifact (INT8 against fp32 at build time and in
``calibrate --report``, the tower parts' sensitivity probes, TensorRT against onnxruntime on a device) reads only the
token contract, so the comparator lives beside ``VisionOutput`` and both sides use the same one.
"""

from __future__ import annotations

import numpy as np

from .contract import VisionOutput
from .graph_facts import SelectionAgreement


def agreement(reference: VisionOutput, candidate: VisionOutput) -> SelectionAgreement:
    """How much of ``reference``'s selection ``candidate`` keeps: Jaccard of the kept patch sets, and the cosine of
    the tokens both have: the same patch, or the same merged token (PruMerge's extra token, VisionZip's CLS and
    contextual tokens: the k-th token of each sentinel index paired with the other's k-th)."""
    jaccards, diffs, same, cosines = [], [], [], []
    for b in range(len(reference.num_tokens)):
        n_ref, n_got = int(reference.num_tokens[b]), int(candidate.num_tokens[b])
        ref_idx = [int(i) for i in reference.indices[b, :n_ref]]
        got_idx = [int(i) for i in candidate.indices[b, :n_got]]
        a, c = {p for p in ref_idx if p >= 0}, {p for p in got_idx if p >= 0}
        jaccards.append(len(a & c) / len(a | c) if a | c else 1.0)
        diffs.append(abs(n_ref - n_got))
        same.append(ref_idx == got_idx)
        pairs = [(ref_idx.index(p), got_idx.index(p)) for p in a & c]
        for sentinel in {p for p in ref_idx if p < 0}:
            pairs += list(zip([i for i, p in enumerate(ref_idx) if p == sentinel],
                              [j for j, p in enumerate(got_idx) if p == sentinel]))
        x = reference.tokens[b][[i for i, _ in pairs]].astype(np.float64)
        y = candidate.tokens[b][[j for _, j in pairs]].astype(np.float64)
        denom = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        cosines.append(float(np.mean(np.sum(x * y, axis=1) / np.where(denom > 0, denom, 1.0))) if pairs else 0.0)
    return SelectionAgreement(len(jaccards), float(np.mean(jaccards)), float(np.min(jaccards)), float(np.mean(diffs)),
                              float(np.mean(same)), float(np.mean(cosines)))
