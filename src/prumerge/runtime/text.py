"""The artifact's text graph on onnxruntime (``build --text-encoder``): a question -> CLIP text embeddings, one per
segment of ``positions`` tokens, for a vision graph whose reducer compares the question in CLIP's space.

Tokenized with the CLIP checkpoint's own ``tokenizer.json`` through ``tokenizers`` (start and end tokens from its
post-processor), padded and cut as the released CDPruner code does (``artifact.contract.text_segments``, which the
build's export and validation also use). No torch, no transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact.contract import TEXT_INPUTS as INPUT_NAMES, text_segments as segments
from ..artifact.manifest import inside
from ..errors import ArtifactError, InputError
from .llm import ensure_tokenizers


class TextEncoder:
    """The artifact's text graph and CLIP tokenizer: ``embed(question)`` -> ``[segments, width]``."""

    def __init__(self, directory: Path, spec, provider: str = "cpu") -> None:
        from .vision import _ort_session

        self.spec = spec
        base = inside(directory, spec.directory)
        # the runtime's one session opener (provider check, CUDA options, one-line load error); a small graph that
        # runs once a question gets no TensorRT engine of its own, as the decoder gets none
        self.session, _ = _ort_session(inside(base, spec.graph), "cuda" if provider == "tensorrt" else provider)
        try:
            self.tokenizer = ensure_tokenizers().from_file(str(inside(base, spec.tokenizer)))
        except Exception as exc:
            raise ArtifactError(f"cannot load the text graph's tokenizer {base / spec.tokenizer}: {exc}") from exc
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise ArtifactError(f"the text graph {base / spec.graph} takes {', '.join(names)}, not "
                                f"{', '.join(INPUT_NAMES)}: the manifest does not describe it")

    def embed(self, text: str) -> np.ndarray:
        """``[S, width]`` float32: one CLIP text embedding per segment of the tokenized ``text``."""
        ids = self.tokenizer.encode(text).ids
        input_ids, mask = segments(ids, self.spec.positions)
        if len(input_ids) > self.spec.max_segments:
            raise InputError(f"the question is {len(ids)} CLIP tokens long; the text graph takes at most "
                             f"{self.spec.max_segments * self.spec.positions}")
        embeds = self.session.run(None, dict(zip(INPUT_NAMES, (input_ids, mask))))[0].astype(np.float32)
        if embeds.shape != (len(input_ids), self.spec.width):
            raise ArtifactError(f"the text graph gave embeddings of shape {embeds.shape}, the manifest says "
                                f"[segments, {self.spec.width}]")
        return embeds
