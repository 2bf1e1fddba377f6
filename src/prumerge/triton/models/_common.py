"""Shared by the Python-backend models: where the artifact is, and reading optional scalar inputs."""

from __future__ import annotations

import json
from pathlib import Path


def artifact_dir(args: dict) -> Path:
    """The artifact named by the model config's ``artifact`` parameter, relative to the model's directory."""
    config = json.loads(args["model_config"])
    relative = config["parameters"]["artifact"]["string_value"]
    model_dir = Path(args["model_repository"])  # .../models/NAME (Triton passes the model's directory)
    return (model_dir / relative).resolve()


def parameter(args: dict, name: str, default: str) -> str:
    """A string parameter of the model's config (``parameters { key: NAME ... }``), or ``default``."""
    config = json.loads(args["model_config"])
    return config.get("parameters", {}).get(name, {}).get("string_value", default)


def instance_threads(args: dict) -> int:
    """This instance's share of the cores: the cores this process may use over the model's instance count (at
    least 1). N instances that each took every core would contend for them (measured: 8 clients over 2 LLM
    instances on 2 cores were no faster than one instance); a share each lets their decodes really overlap."""
    import os

    config = json.loads(args["model_config"])
    instances = sum(max(1, int(group.get("count", 1))) for group in config.get("instance_group", [])) or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // instances)


def scalar(pb_utils, request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    return default if value.size == 0 else value[0].item()


def text(pb_utils, request, name: str) -> str:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ""
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
