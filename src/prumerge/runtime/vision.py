"""``VisionSession``: an artifact's vision graph on onnxruntime, behind one small interface.

Loading checks the artifact first (manifest format, the manifest's own hash, every file's sha256), so a tampered
or half-copied artifact fails at load with the file's name, not later with a confusing onnxruntime message.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..artifact.contract import OUTPUT_NAMES, PATCH_OUTPUTS, QUESTION_INPUTS, VisionOutput
from ..artifact.manifest import Manifest, TensorSpec, inside
from ..errors import ArtifactError, BackendUnavailableError, InputError
from .session import GraphIO, VisionSessionBase

# onnxruntime's CUDA provider runs fp32 MatMul/Conv in TF32 by default (provider option ``use_tf32``, default 1).
# Measured on an H200 with the real DINOv2-S and 28 photos (bench/bench_gpu.py): TF32 moves the key cosines by 2e-4
# (the fp32 near-tie window is 2e-5) and changes token counts, so an fp32 graph would no longer match the build's
# validation. fp32 means fp32 here; fp16 graphs are unaffected (their MatMuls are fp16 anyway).
CUDA_OPTIONS = {"use_tf32": "0"}

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class VisionSession(VisionSessionBase):
    """Open with :meth:`open`; call :meth:`run` on images or :meth:`run_pixels` on preprocessed arrays."""

    def __init__(self, directory: Path | None, manifest: Manifest | None, graph: dict, session, provider: str,
                 batch_max: int | None = None) -> None:
        super().__init__(directory, manifest, graph, batch_max)
        self.session = session
        self.provider = provider

    @classmethod
    def open(cls, directory: str | Path, provider: str = "cpu", verify: bool = True, graph: str = "vision",
             profile_dir: str | Path | None = None, expect_sha256: str | None = None) -> "VisionSession":
        """Load an artifact. ``provider``: cpu | cuda | tensorrt (onnxruntime EPs; missing ones fall back to CPU
        with a warning). ``verify=False`` skips re-hashing large files (the manifest is always checked).
        ``graph="baseline"`` opens the unreduced graph of a build made with ``--baseline``. ``profile_dir`` turns on
        onnxruntime's per-node profiler (JSON written there by :meth:`end_profiling`). ``expect_sha256``: the
        manifest hash you got from the builder; anything else is refused (see :mod:`prumerge.artifact.manifest`)."""
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if verify or expect_sha256:
            manifest.verify_files(directory, expect_sha256=expect_sha256)
        spec = {"vision": manifest.vision, "baseline": manifest.baseline}.get(graph)
        if spec is None:
            if graph == "baseline":
                raise ArtifactError(f"{directory} has no baseline (method none) graph; rebuild with --baseline")
            raise InputError(f"unknown graph {graph!r}; choose vision or baseline")
        if spec.format != "onnx":
            raise ArtifactError(f"{directory}: vision graph format {spec.format!r} needs another session")
        if provider == "tensorrt" and spec.engine:
            from .tensorrt import TensorRTSession  # the artifact's own engine, not onnxruntime's TensorRT EP

            return TensorRTSession(directory, manifest, spec)
        if spec.attention == "fused":
            _require_fused_attention(directory)
        session, used = _ort_session(inside(directory, spec.file), provider, profile_dir)
        _check_io(session, spec, directory)
        opened = cls(directory, manifest, spec, session, used)
        if spec.reducer_graph is not None:
            opened.open_reducer(inside(directory, spec.reducer_graph), provider)
        return opened

    @classmethod
    def from_graph(cls, path: str | Path, provider: str = "cpu", batch_max: int = 8) -> "VisionSession":
        """A vision graph file on its own (no artifact around it): what the build validates before the artifact
        exists and what INT8 is compared on. The same output binding, input checks and batch splitting as an
        artifact's session; the input spec is read from the graph itself."""
        path = Path(path)
        session, used = _ort_session(path, provider)
        graph_input, *others = session.get_inputs()
        size = graph_input.shape[-1]
        if not isinstance(size, int):
            raise ArtifactError(f"{path}: the vision graph's image size is not fixed ({graph_input.shape})")
        if graph_input.type not in _ORT_TYPES:
            raise ArtifactError(f"{path}: the vision graph's input type {graph_input.type} is not one prumerge runs")
        spec = GraphIO([TensorSpec(i.name, _ORT_TYPES.get(i.type), list(i.shape)) for i in (graph_input, *others)],
                       [TensorSpec(o.name, _ORT_TYPES.get(o.type), list(o.shape)) for o in session.get_outputs()])
        _check_io(session, spec, path)
        return cls(None, None, spec, session, used, batch_max=batch_max)

    # ------------------------------------------------------------------ running
    def run_batch(self, feed: dict):
        return dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feed)))

    # ------------------------------------------------------------------ a second question on an image
    def open_reducer(self, path: Path, provider: str = "cpu") -> None:
        self.reducer, _ = _ort_session(path, provider)
        names = {i.name for i in self.reducer.get_inputs()}
        self.patch_names = [n for n in PATCH_OUTPUTS if n in names]
        produced = {o.name for o in self.session.get_outputs()}
        if not self.patch_names or not set(self.patch_names) <= produced or not set(QUESTION_INPUTS) <= names:
            raise ArtifactError(f"{path}: the reducer graph takes {', '.join(sorted(names))}, which the vision graph's "
                                "outputs and the question do not provide")

    def run_keeping_patches(self, pixel_values: np.ndarray, question: dict) -> tuple:
        """``(VisionOutput, patches)``: the whole graph, and what its reducer chose among (``{name: [B, N, W]}``)
        for :meth:`reduce_patches` with another question. One batch (at most ``batch_max`` images)."""
        feed = self.check_pixels(pixel_values)
        if len(feed) > self.batch_max:
            raise InputError(f"at most {self.batch_max} images at once here, got {len(feed)}")
        wanted = [*OUTPUT_NAMES, *self.patch_names]
        values = dict(zip(wanted, self.session.run(wanted, {self.input_name: feed, **self.check_question(question, len(feed))})))
        return VisionOutput.from_named(values), {n: values[n] for n in self.patch_names}

    def reduce_patches(self, patches: dict, question: dict) -> VisionOutput:
        """The reducer graph alone on an image's kept ``patches`` with ``question``: the whole graph's output for
        that question, without the tower."""
        batch = len(next(iter(patches.values())))
        feed = {**patches, **self.check_question(question, batch)}
        return VisionOutput.from_named(dict(zip(OUTPUT_NAMES, self.reducer.run(list(OUTPUT_NAMES), feed))))

    def end_profiling(self) -> Path:
        """Stop onnxruntime's profiler; return its JSON file (sessions opened with ``profile_dir``)."""
        return Path(self.session.end_profiling())


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(bool)": "bool",
              "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


FUSED_ATTENTION_ONNXRUNTIME = (1, 23)  # the first onnxruntime with a kernel for ONNX's Attention op (opset 23)


def _require_fused_attention(directory: Path) -> None:
    """One line before onnxruntime's own (a missing-kernel message about node names) when this onnxruntime is too
    old for the graph's fused attention: the device install allows onnxruntime 1.20 (JetPack's wheels lag)."""
    import re

    import onnxruntime as ort

    version = tuple(int(part) for part in re.findall(r"\d+", ort.__version__)[:2])
    if version < FUSED_ATTENTION_ONNXRUNTIME:
        raise ArtifactError(f"{directory}: the vision graph computes attention with ONNX's fused Attention op (opset 23), "
                            f"which onnxruntime {ort.__version__} cannot run (1.23 or newer can): upgrade onnxruntime, "
                            "or rebuild the artifact with --opset 18")


def _check_io(session, spec, directory: Path) -> None:
    """The graph's own inputs and outputs are what the manifest says (name, element type), before anything runs."""
    inputs = session.get_inputs()
    want = spec.inputs[0]
    if [(i.name, _ORT_TYPES.get(i.type)) for i in inputs] != [(s.name, s.dtype) for s in spec.inputs]:
        got = ", ".join(f"{i.name} {i.type}" for i in inputs)
        said = ", ".join(f"{s.name} {s.dtype}" for s in spec.inputs)
        raise ArtifactError(f"{directory}: the vision graph takes {got}, but the manifest says {said}")
    actual = [d if isinstance(d, int) else None for d in inputs[0].shape]
    if len(actual) != len(want.shape) or any(a is not None and isinstance(w, int) and a != w
                                              for a, w in zip(actual, want.shape)):
        raise ArtifactError(f"{directory}: the vision graph's input is {list(inputs[0].shape)}, but the manifest says "
                            f"{want.shape}; the manifest does not describe this graph")
    recorded = {o.name: o.dtype for o in spec.outputs}
    for output in session.get_outputs():
        if output.name in OUTPUT_NAMES and recorded.get(output.name) != _ORT_TYPES.get(output.type):
            raise ArtifactError(f"{directory}: the vision graph's output {output.name} is {output.type}, but the manifest "
                                f"says {recorded.get(output.name)}")
    missing = [n for n in OUTPUT_NAMES if n not in {o.name for o in session.get_outputs()}]
    if missing:
        raise ArtifactError(f"{directory}: the vision graph lacks the output(s) {', '.join(missing)}")


def _ort_session(path: Path, provider: str, profile_dir: str | Path | None = None):
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a dependency
        raise BackendUnavailableError("onnxruntime is not installed") from exc
    if provider not in PROVIDERS:
        raise InputError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    available = set(ort.get_available_providers())
    wanted = [p for p in PROVIDERS[provider] if p in available]
    if wanted[0] != PROVIDERS[provider][0]:
        warnings.warn(f"{PROVIDERS[provider][0]} is not available in this onnxruntime; running on {wanted[0]}", RuntimeWarning, stacklevel=3)
    options = ort.SessionOptions()
    providers = [(p, dict(CUDA_OPTIONS)) if p == "CUDAExecutionProvider" else p for p in wanted]
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / path.stem)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        raise ArtifactError(f"onnxruntime cannot load {path}: {exc}") from exc
    return session, session.get_providers()[0]
