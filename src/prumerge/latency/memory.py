"""Memory as a first-class figure: what an artifact weighs on disk by part, and what the decoder's KV cache holds at
the context a run used. An Orin Nano has 8 GB for everything, so these sit beside the latencies in every profile.

Bytes come from the manifest's file records (hashed at build time, so they are the files the runtime reads); the
KV cache is the decoder's geometry (layers x 2 x KV heads x head size x positions x element size), the same buffers
``runtime.llm`` binds, at the most positions any run of the profile reached.
"""

from __future__ import annotations

import numpy as np

MB = 1 << 20


def artifact_parts(manifest, graph) -> dict:
    """MB by part: this graph's vision files, the LLM decoder's files, its embedding table, the rest of the LLM
    folder (tokenizer, config), each from the manifest's recorded bytes."""
    files = manifest.files
    parts = {"vision": 0, "llm_decoder": 0, "embeddings": 0, "llm_other": 0}
    llm = manifest.llm
    llm_dir = (llm.directory.rstrip("/") + "/") if llm is not None and llm.directory else None
    embeddings = f"{llm_dir}{llm.embeddings}" if llm_dir and llm.embeddings else None
    decoder = f"{llm_dir}{llm.decoder}" if llm_dir and llm.decoder else None
    for name, meta in files.items():
        if name == graph.file or name.startswith(graph.file + "."):  # the graph and its external data
            parts["vision"] += meta["bytes"]
        elif embeddings and name == embeddings:
            parts["embeddings"] += meta["bytes"]
        elif decoder and (name == decoder or name.startswith(decoder + ".")):
            parts["llm_decoder"] += meta["bytes"]
        elif llm_dir and name.startswith(llm_dir):
            parts["llm_other"] += meta["bytes"]
    return {part: round(size / MB, 2) for part, size in parts.items()}


def kv_cache_mb(llm, positions: int) -> float | None:
    """The KV cache's MB at ``positions`` (None without a decoder)."""
    if llm is None or not llm.decoder or not llm.num_layers or not llm.num_kv_heads or not llm.head_size:
        return None
    element = np.dtype(llm.kv_dtype or "float32").itemsize
    return round(llm.num_layers * 2 * llm.num_kv_heads * llm.head_size * int(positions) * element / MB, 3)
