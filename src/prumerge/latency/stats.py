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


def peak_rss_mb() -> float:
    """This process's own peak resident memory, MB.

    ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process image. ``getrusage``'s ``ru_maxrss``
    survives ``exec`` on Linux, so a child started from a large parent would report the parent's peak (what made
    every method of ``bench_pipeline`` show the build's 13 GB). ``ru_maxrss`` only where /proc is absent.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
