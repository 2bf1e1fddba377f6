"""``VisionSession``: an artifact's vision graph on onnxruntime, behind one small interface.

Loading checks the artifact first (manifest format, the manifest's own hash, every file's sha256), so a tampered
or half-copied artifact fails at load with the file's name, not later with a confusing onnxruntime message.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError, InputError
from ..manifest import Manifest, inside
from .preprocess import ImageLike, PreprocessConfig, preprocess_batch

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclasses.dataclass
class VisionOutput:
    """The token contract as numpy arrays; ``tokens[b, :num_tokens[b]]`` are image ``b``'s LLM-ready tokens."""

    tokens: np.ndarray  # [B, N, D]
    num_tokens: np.ndarray  # [B] int64
    indices: np.ndarray  # [B, N] int64 source patch, -1 extra token, -2 padding
    truncated: np.ndarray  # [B] bool

    def image(self, b: int) -> np.ndarray:
        return self.tokens[b, : int(self.num_tokens[b])]

    def per_image(self) -> list[np.ndarray]:
        return [self.image(b) for b in range(len(self.num_tokens))]

    def arrays(self) -> dict:
        """``tokens / num_tokens / indices`` as a dict, the form the comparison helpers take."""
        return {"tokens": self.tokens, "num_tokens": self.num_tokens, "indices": self.indices}


class VisionSession:
    """Open with :meth:`open`; call :meth:`run` on images or :meth:`run_pixels` on preprocessed arrays."""

    def __init__(self, directory: Path, manifest: Manifest, graph: dict, session, provider: str) -> None:
        self.directory = directory
        self.manifest = manifest
        self.graph = graph
        self.session = session
        self.provider = provider
        self.preprocess = PreprocessConfig.from_dict(manifest.preprocess)
        spec = graph["inputs"][0]
        self.input_name = spec["name"]
        self.input_dtype = np.dtype(spec["dtype"])
        self.image_size = int(spec["shape"][-1])
        self.batch_max = int(graph.get("batch_max", 1))

    @classmethod
    def open(cls, directory: str | Path, provider: str = "cpu", verify: bool = True, graph: str = "vision",
             profile_dir: str | Path | None = None, expect_sha256: str | None = None) -> "VisionSession":
        """Load an artifact. ``provider``: cpu | cuda | tensorrt (onnxruntime EPs; missing ones fall back to CPU
        with a warning). ``verify=False`` skips re-hashing large files (the manifest is always checked).
        ``graph="baseline"`` opens the unreduced graph of a build made with ``--baseline``. ``profile_dir`` turns on
        onnxruntime's per-node profiler (JSON written there by :meth:`end_profiling`). ``expect_sha256``: the
        manifest hash you got from the builder; anything else is refused (see :mod:`prumerge.manifest`)."""
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if verify or expect_sha256:
            manifest.verify_files(directory, expect_sha256=expect_sha256)
        spec = {"vision": manifest.vision, "baseline": manifest.baseline}.get(graph)
        if spec is None:
            if graph == "baseline":
                raise ArtifactError(f"{directory} has no baseline (method none) graph; rebuild with --baseline")
            raise InputError(f"unknown graph {graph!r}; choose vision or baseline")
        if spec.get("format") != "onnx":
            raise ArtifactError(f"{directory}: vision graph format {spec.get('format')!r} needs another session")
        if provider == "tensorrt" and spec.get("engine"):
            from .tensorrt import TensorRTSession  # the artifact's own engine, not onnxruntime's TensorRT EP

            return TensorRTSession(directory, manifest, spec)
        return cls(directory, manifest, spec, *_ort_session(inside(directory, spec["file"]), provider, profile_dir))

    # ------------------------------------------------------------------ running
    def run(self, images: ImageLike | list[ImageLike]) -> VisionOutput:
        """Paths, bytes, PIL images or HWC arrays -> reduced tokens (preprocessed as the checkpoint's processor does)."""
        return self.run_pixels(preprocess_batch(images, self.preprocess))

    def run_pixels(self, pixel_values: np.ndarray) -> VisionOutput:
        """``[B, 3, S, S]`` normalised pixels -> reduced tokens. Batches over ``batch_max`` are split."""
        if not isinstance(pixel_values, np.ndarray):
            raise InputError(f"pixel_values must be a numpy array, got {type(pixel_values).__name__}")
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            raise InputError(f"pixel_values must have shape [batch, 3, {self.image_size}, {self.image_size}], got {pixel_values.shape}")
        if not np.isfinite(pixel_values).all():
            raise InputError("pixel_values contains NaN or Inf")
        feed = pixel_values.astype(self.input_dtype, copy=False)
        parts = [self._run(feed[i : i + self.batch_max]) for i in range(0, len(feed), self.batch_max)]
        return parts[0] if len(parts) == 1 else concat_outputs(parts, int(self.manifest.reducer["padding_index"]))

    def end_profiling(self) -> Path:
        """Stop onnxruntime's profiler; return its JSON file (sessions opened with ``profile_dir``)."""
        return Path(self.session.end_profiling())

    def _run(self, feed: np.ndarray) -> VisionOutput:
        tokens, num_tokens, indices, truncated = self.session.run(None, {self.input_name: feed})
        return VisionOutput(tokens, num_tokens.astype(np.int64), indices.astype(np.int64), truncated.astype(bool))


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
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / path.stem)
    try:
        session = ort.InferenceSession(str(path), options, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        raise ArtifactError(f"onnxruntime cannot load {path}: {exc}") from exc
    return session, session.get_providers()[0]


def concat_outputs(parts: list[VisionOutput], padding_index: int) -> VisionOutput:
    """Batches of one contract joined, the token axis padded to the widest (dynamic contract batches differ)."""
    width = max(p.tokens.shape[1] for p in parts)

    def pad(a, fill):
        out = np.full((a.shape[0], width, *a.shape[2:]), fill, dtype=a.dtype)
        out[:, : a.shape[1]] = a
        return out

    return VisionOutput(
        np.concatenate([pad(p.tokens, 0) for p in parts]),
        np.concatenate([p.num_tokens for p in parts]),
        np.concatenate([pad(p.indices, padding_index) for p in parts]),
        np.concatenate([p.truncated for p in parts]),
    )
