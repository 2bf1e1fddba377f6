"""Which vision-graph node belongs to which stage, and how long each stage took in onnxruntime's profile.

The dynamo exporter stores each node's PyTorch module scope and stack trace in ``metadata_props``: nodes under
``encoder.tower`` are the vision encoder, under ``encoder.projector`` the projector, and nodes traced from a
reducer (``artifact.node_stages``: the reducers are plain functions, so their nodes carry no module scope, only
their stack traces) the reducer. So the reducer's share is measured per node, not inferred.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..artifact.node_stages import STAGES

def node_times(profile_json: Path, stages: dict, skip_runs: int = 0) -> dict:
    """Total kernel time (ms) per stage from an onnxruntime profile, dropping each node's first ``skip_runs``
    executions (the warm-up runs)."""
    events = json.loads(Path(profile_json).read_text())
    per_node = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_node[event["name"][: -len("_kernel_time")]].append(event.get("dur", 0))
    totals = dict.fromkeys(STAGES, 0.0)
    for name, durations in per_node.items():
        totals[stages.get(name, "vision_other")] += sum(durations[skip_runs:]) / 1e3
    return totals
