"""Which files an ONNX graph makes onnxruntime open: the ``location`` of every tensor stored as external data.

Why here, without the ``onnx`` package: the device side has only onnxruntime, and onnxruntime loads whatever file
a graph's external-data entry names. Pinning an artifact's hash is worth something only if every such file is one
the manifest hashes, so ``verify_files`` reads these locations from the graph itself. This is a small reader of the
protobuf wire format that walks exactly the messages that can hold tensors (graph initializers, sparse
initializers, node attributes and their subgraphs, functions); everything else is skipped by length.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from ..errors import ArtifactError

# field numbers in onnx.proto3
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTE = 5
_FUNCTION_NODE = 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64


def _varint(data, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data, start: int, end: int):
    """``(field number, payload start, payload end)`` of each length-delimited field in ``data[start:end]``."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError("a field runs past its message")
            yield number, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("a field runs past its message")


def _tensor(data, start, end, found: set) -> None:
    for number, a, b in _fields(data, start, end):
        if number == _TENSOR_EXTERNAL:
            entry = {n: bytes(data[x:y]).decode("utf-8", "replace") for n, x, y in _fields(data, a, b)}
            if entry.get(_ENTRY_KEY) == "location":
                found.add(entry.get(_ENTRY_VALUE, ""))


def _sparse(data, start, end, found: set) -> None:
    for number, a, b in _fields(data, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(data, a, b, found)


def _graph(data, start, end, found: set, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("graphs nested too deep")
    for number, a, b in _fields(data, start, end):
        if number == _GRAPH_INITIALIZER:
            _tensor(data, a, b, found)
        elif number == _GRAPH_SPARSE:
            _sparse(data, a, b, found)
        elif number == _GRAPH_NODE:
            _node(data, a, b, found, depth)


def _node(data, start, end, found: set, depth: int) -> None:
    for number, a, b in _fields(data, start, end):
        if number != _NODE_ATTRIBUTE:
            continue
        for field, x, y in _fields(data, a, b):
            if field in (_ATTR_T, _ATTR_TENSORS):
                _tensor(data, x, y, found)
            elif field in (_ATTR_G, _ATTR_GRAPHS):
                _graph(data, x, y, found, depth + 1)
            elif field in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse(data, x, y, found)


def external_data_locations(path: str | Path) -> set:
    """Every external-data ``location`` the graph at ``path`` names (an empty set for a self-contained graph)."""
    path = Path(path)
    found: set = set()
    try:
        with open(path, "rb") as handle:
            if path.stat().st_size == 0:
                raise ValueError("empty file")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for number, a, b in _fields(data, 0, len(data)):
                    if number == _MODEL_GRAPH:
                        _graph(data, a, b, found, 0)
                    elif number == _MODEL_FUNCTIONS:
                        for field, x, y in _fields(data, a, b):
                            if field == _FUNCTION_NODE:
                                _node(data, x, y, found, 0)
    except (ValueError, IndexError) as exc:
        raise ArtifactError(f"{path} is not a readable ONNX graph ({exc})") from None
    return found
