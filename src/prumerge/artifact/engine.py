"""What a TensorRT engine is tied to (TensorRT version, GPU, compute capability), read on this machine and
compared with what the manifest recorded: the runtime refuses an engine built elsewhere, naming both."""

from __future__ import annotations

import subprocess
from pathlib import Path

ENGINE_FILE = "vision.engine"


def device_facts() -> dict:
    """TensorRT version, GPU name and compute capability of this machine (what an engine is tied to)."""
    facts = {"tensorrt_version": None, "gpu": None, "compute_capability": None}
    try:
        import tensorrt as trt

        facts["tensorrt_version"] = trt.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            name, cap = [x.strip() for x in out.stdout.strip().splitlines()[0].split(",")]
            facts["gpu"], facts["compute_capability"] = name, cap
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    if facts["gpu"] is None:
        facts.update(_jetson_facts())
    return facts


def _jetson_facts() -> dict:
    model = Path("/proc/device-tree/model")
    if model.is_file():
        return {"gpu": model.read_text(errors="ignore").strip("\x00 \n"), "compute_capability": "8.7"}
    return {}


def engine_mismatch(recorded: dict, current: dict) -> str | None:
    """Why an engine built with ``recorded`` facts cannot run here (``current``), or None."""
    problems = []
    if recorded.get("tensorrt_version") != current.get("tensorrt_version"):
        problems.append(f"TensorRT {recorded.get('tensorrt_version')} built it, this machine has {current.get('tensorrt_version')}")
    if recorded.get("gpu") != current.get("gpu") or recorded.get("compute_capability") != current.get("compute_capability"):
        problems.append(f"it was built for {recorded.get('gpu')} (sm {recorded.get('compute_capability')}), "
                        f"this machine has {current.get('gpu')} (sm {current.get('compute_capability')})")
    if not problems:
        return None
    return "; ".join(problems) + ". Rebuild the engine here: prumerge-export engine DIR"


# ---------------------------------------------------------------------------------------------- the builder
