"""Summary statistics of a list of timings."""

from __future__ import annotations

import numpy as np


def summarize(values) -> dict:
    """p50 / p90 / p99 / mean / min / max (ms) and n; linear-interpolated percentiles, as numpy computes them."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None, "n": 0}
    p50, p90, p99 = np.percentile(data, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(data.mean()),
            "min": float(data.min()), "max": float(data.max()), "n": int(data.size)}
