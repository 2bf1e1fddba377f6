"""matplotlib for the pictures prumerge draws (profile bars, calibration histograms), or one clear error."""

from __future__ import annotations

from .errors import BackendUnavailableError


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), or one clear error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BackendUnavailableError("plots need matplotlib (pip install matplotlib, or prumerge[profile])") from exc
    return plt
