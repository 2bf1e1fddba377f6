"""Per-stage latency and memory of the whole pipeline, methods side by side (torch-free, like the runtime)."""

from .runner import MethodProfile, ProfileReport, run

__all__ = ["MethodProfile", "ProfileReport", "run"]
