"""The question as a reducer that reads it (CDPruner) takes it: the user's words, image markers removed, as rows of
embeddings: the LLM's own input embeddings of its tokens, or (an artifact with a CLIP text graph) one CLIP text
embedding per 77-token segment.

One class for every caller that feeds such a graph: the pipeline (``run``, ``serve``, ``evaluate``, ``profile``) and
Triton's entry model, which has no decoder session and reads the embedding table alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError


class QuestionEmbedder:
    def __init__(self, marker: str, tokenizer, embed: Callable[[list], np.ndarray], text=None) -> None:
        """``tokenizer``: the LLM's, encoding special-token strings as plain text; ``embed``: token ids -> their
        input-embedding rows; ``text``: the artifact's :class:`~prumerge.runtime.text.TextEncoder`, or None."""
        self.marker = marker
        self.tokenizer = tokenizer
        self.embed = embed
        self.text = text

    @classmethod
    def from_artifact(cls, directory: str | Path, manifest, provider: str = "cpu") -> "QuestionEmbedder":
        """From the artifact's files, without a decoder session: its tokenizer, its embedding table (memory-mapped)
        and, when it has one, its text graph."""
        from ..artifact.manifest import inside
        from .llm import embed_ids, ensure_tokenizers, plain_tokenizer

        directory = Path(directory)
        spec = manifest.llm
        base = inside(directory, spec.directory)
        tokenizer = plain_tokenizer(ensure_tokenizers().from_file(str(inside(base, spec.tokenizer))))
        table = np.load(inside(base, spec.embeddings), mmap_mode="r", allow_pickle=False)
        text = None
        if manifest.text is not None:
            from .text import TextEncoder

            text = TextEncoder(directory, manifest.text, provider)
        return cls(spec.image_marker or "<image>", tokenizer, lambda ids: embed_ids(table, ids), text)

    def rows(self, prompt: str) -> np.ndarray:
        """``[rows, width]`` float32 for one prompt."""
        text = " ".join(prompt.replace(self.marker, " ").split())
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids if text else []
        if not ids:
            raise InputError("this artifact's reducer keeps the tokens relevant to the question, and the prompt has "
                             "no words besides its image markers")
        return self.text.embed(text) if self.text is not None else self.embed(ids)

    def arrays(self, prompt: str, batch: int, multiple: int = 1) -> dict:
        """The graph's question inputs for ``batch`` images of one prompt: the same rows for each, padded with
        masked rows (which change nothing) to a multiple of ``multiple`` rows, so that questions of nearby lengths
        share one shape (Triton batches requests of equal shapes only)."""
        rows = self.rows(prompt)
        count = -(-len(rows) // multiple) * multiple
        embeds = np.zeros((batch, count, rows.shape[1]), dtype=np.float32)
        embeds[:, : len(rows)] = rows
        mask = np.zeros((batch, count), dtype=np.float32)
        mask[:, : len(rows)] = 1.0
        return {"question_embeds": embeds, "question_mask": mask}
