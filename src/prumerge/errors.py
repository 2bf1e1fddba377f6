"""One exception family, so the CLI can map each kind of failure to one clear message and exit code.

Every error a user can cause (bad input, bad checkpoint, tampered artifact, missing backend) is raised as a
subclass of :class:`PruMergeError`; a bare ``assert`` or a stray ``KeyError`` would hide which of those it was.
"""

from __future__ import annotations


class PruMergeError(Exception):
    """Base of every error prumerge raises on purpose."""

    exit_code = 1


class ConfigError(PruMergeError, ValueError):
    """An option or a combination of options that cannot work (e.g. negative capacity, unknown method)."""

    exit_code = 2


class InputError(PruMergeError, ValueError):
    """Input data that cannot be processed: wrong shape, NaN/Inf values, a corrupt image."""

    exit_code = 3


class CheckpointError(PruMergeError):
    """A model checkpoint that cannot be read or lacks the weights the vision graph needs."""

    exit_code = 4


class ExportError(PruMergeError):
    """The ONNX export or one of its graph checks failed."""

    exit_code = 5


class ValidationError(PruMergeError):
    """An exported graph disagrees with the PyTorch reference beyond the stated tolerance."""

    exit_code = 6


class ArtifactError(PruMergeError):
    """An artifact directory is missing a file, was edited after the build, or is of an unknown format version."""

    exit_code = 7


class BackendUnavailableError(PruMergeError):
    """An optional backend (TensorRT, CUDA provider, ...) was asked for but is not installed here."""

    exit_code = 8
