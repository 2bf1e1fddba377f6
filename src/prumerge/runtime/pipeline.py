"""``Pipeline``: image(s) + prompt -> reduced visual tokens -> quantised LLM -> text, with counts and timings.

The prompt's ``<image>`` markers are expanded to exactly each image's ``num_tokens`` reduced tokens (the count the
vision graph reports, so buffers are sized from data, not from the method's nominal budget). Visual tokens and text
embeddings are concatenated into one ``inputs_embeds`` prefill; decoding continues on the KV cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import ArtifactError, ConfigError, InputError
from ..artifact.manifest import inside
from .llm import OnnxDecoder, Stopwatch, choose_token, ensure_tokenizers, plain_tokenizer
from .preprocess import ImageLike, preprocess_batch
from .vision import VisionSession

POSITIONS = ("contiguous",)
_SLOT = "\u2063PRUMERGE_USER\u2063"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the answer is drawn, checked once when made (a bad value is an :class:`InputError` before any work).
    ``temperature`` 0 is greedy; ``top_p`` keeps the smallest nucleus of that probability; ``stop`` strings end the
    answer before them; ``seed`` makes sampling repeatable."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):  # NaN fails this too
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise InputError(f"seed must be an integer in 0..2**63-1, got {seed}")
        if isinstance(self.stop, str):  # one string is not a list of its characters
            raise InputError(f"stop must be a sequence of strings, got the string {self.stop!r}")
        stop = tuple(self.stop)
        if not all(isinstance(x, str) for x in stop):
            raise InputError("stop must be a sequence of strings")
        object.__setattr__(self, "stop", stop)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One piece of the prompt as the decoder sees it, as llama.cpp's mtmd types them: text (its token ``ids``) or
    an image (its index among the prompt's images). ``n_tokens``: rows it contributes to the prefill (an image's
    is the count its vision graph reported, None until then); ``n_pos``: positions it occupies (contiguous
    positions here, so equal to ``n_tokens``; per-patch positions would make them differ)."""

    kind: str  # "text" | "image"
    ids: tuple = ()
    image: int | None = None
    n_tokens: int | None = None
    n_pos: int | None = None

    @classmethod
    def text(cls, ids) -> "Chunk":
        return cls("text", tuple(ids), None, len(ids), len(ids))

    @classmethod
    def picture(cls, index: int, n_tokens: int | None = None) -> "Chunk":
        return cls("image", (), index, n_tokens, n_tokens)


def place_images(chunks: Sequence[Chunk], visual_counts: Sequence[int]) -> list:
    """``chunks`` with each image's ``n_tokens``/``n_pos`` set to the count its vision graph reported."""
    return [Chunk.picture(c.image, int(visual_counts[c.image])) if c.kind == "image" else c for c in chunks]


def chunk_starts(chunks: Sequence[Chunk]) -> list:
    """The first decoder position of each (placed) chunk: the place per-patch positions will hang from."""
    return [int(x) for x in np.cumsum([0, *(c.n_pos for c in chunks)])[:-1]]


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list
    visual_tokens: list  # per image
    prompt_tokens: int  # text + visual positions in the prefill
    generated_tokens: int
    stop_reason: str  # eos | stop_string | max_new_tokens | context (the model's context is full)
    timings_ms: dict  # preprocess, vision, embed, prefill, decode, ttft, total; decode_ms_per_token, tokens_per_s
    method: str

    def summary(self) -> str:
        """One line: tokens in and out, why it stopped, where the time went (what ``run`` prints after the answer)."""
        t = self.timings_ms
        return (f"[{self.method}] visual tokens {self.visual_tokens}, prompt {self.prompt_tokens} positions, generated "
                f"{self.generated_tokens} ({self.stop_reason}); TTFT {t['ttft']:.0f} ms (vision {t.get('vision', 0):.0f}, "
                f"prefill {t['prefill']:.0f}), decode {t['decode_ms_per_token'] or 0:.1f} ms/token")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Pipeline:
    def __init__(self, vision: VisionSession | None, decoder: OnnxDecoder, tokenizer, spec, graph=None) -> None:
        """``spec``: the manifest's ``LLMSection`` (prompt format, special tokens, decoder); ``graph``: the vision
        graph's section (default: the session's; given when there is none)."""
        self.vision = vision
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.spec = spec
        self.marker = spec.image_marker or "<image>"
        graph = graph if graph is not None else (vision.graph if vision is not None else None)
        self.method = graph.method if graph is not None else "?"
        self.output_width = graph.output_width if graph is not None else None
        self.text = None  # the artifact's CLIP text graph (runtime.text.TextEncoder), when it has one
        self._towers: dict = {}  # pixels' digest -> the vision graph's patch outputs (see _vision)
        self._towers_lock = threading.Lock()

    @classmethod
    def from_artifacts(cls, directory: str | Path, provider: str = "cpu", method: str | None = None,
                       verify: bool = True, profile_dir: str | Path | None = None,
                       expect_sha256: str | None = None, with_vision: bool = True,
                       llm_threads: int | None = None) -> "Pipeline":
        """Open an artifact built with an LLM. ``method="none"`` runs its unreduced baseline graph instead;
        ``profile_dir`` enables onnxruntime's per-node profile of the vision graph. ``with_vision=False``: the LLM
        side alone, fed visual tokens computed elsewhere (``generate(visual_tokens=...)``, e.g. by Triton).
        ``llm_threads``: the decoder's intra-op threads (see :class:`~prumerge.runtime.llm.OnnxDecoder`)."""
        directory = Path(directory)
        if with_vision:
            vision = VisionSession.open(directory, provider=provider, verify=verify, graph=_graph_for(method),
                                        profile_dir=profile_dir, expect_sha256=expect_sha256)
            manifest, graph = vision.manifest, vision.graph
        else:
            from ..artifact.manifest import Manifest

            vision, manifest = None, Manifest.read(directory)
            if verify or expect_sha256:
                manifest.verify_files(directory, expect_sha256=expect_sha256)
            graph = manifest.vision
        spec = manifest.llm
        if not spec or not spec.decoder:
            raise ArtifactError(f"{directory} has no LLM (built with --no-llm or from a vision-only checkpoint)")
        if spec.hidden_size != graph.output_width:
            raise ArtifactError(f"the LLM takes {spec.hidden_size}-wide embeddings but the vision graph gives {graph.output_width}")
        Tokenizer = ensure_tokenizers()
        tokenizer = Tokenizer.from_file(str(inside(inside(directory, spec.directory), spec.tokenizer)))
        pipeline = cls(vision, OnnxDecoder(directory, spec, provider, threads=llm_threads), tokenizer, spec, graph)
        if manifest.text is not None:  # CLIP's text graph embeds the question for the reducer
            from .text import TextEncoder

            pipeline.text = TextEncoder(directory, manifest.text, provider)
        return pipeline

    # ------------------------------------------------------------------ prompt assembly
    def prompt_chunks(self, prompt: str, num_images: int, template: bool = True) -> list:
        """The prompt as the decoder will see it, as llama.cpp's mtmd splits it: a list of text and image
        :class:`Chunk` s, in order (no onnxruntime needed).

        User text is tokenized with special-token parsing off (as llama.cpp's ``parse_special=false`` and
        transformers' ``split_special_tokens=True``): ``<|im_end|>`` typed by a user stays text, it cannot end the
        turn. The chat template's own markers stay special. With ``template=False`` (``--raw``) the prompt is the
        whole template, written by the caller, and its special tokens are parsed.
        Without any ``<image>`` marker, the images go before the text (``<image>\n`` each), as LLaVA's CLI does.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"the prompt is not valid UTF-8 text ({exc.reason} at position {exc.start})") from None
        markers = prompt.count(self.marker)
        if markers == 0 and num_images:
            prompt, markers = (self.marker + "\n") * num_images + prompt, num_images
        if markers != num_images:
            if not num_images:
                raise InputError(f"the prompt has {markers} {self.marker} marker(s) but no image was given")
            raise InputError(f"the prompt has {markers} {self.marker} marker(s) for {num_images} image(s); they must match")
        if template:
            before, after = self.spec.prompt_format.format(prompt=_SLOT).split(_SLOT)
            segments = [(before, True), (prompt, False), (after, True)]
        else:
            segments = [(prompt, True)]
        chunks, run = [], [(self.spec.bos_token_id, None)] if self.spec.add_bos else []
        image = 0
        for text, trusted in segments:
            pieces = text.split(self.marker) if not trusted or not template else [text]
            for i, piece in enumerate(pieces):
                if i:  # a marker stood here
                    chunks.append(Chunk.text(self._encode(run)))
                    chunks.append(Chunk.picture(image))
                    image, run = image + 1, []
                run.append((piece, trusted))
        chunks.append(Chunk.text(self._encode(run)))
        return [c for c in chunks if c.kind == "image" or c.n_tokens]

    def _encode(self, run: list) -> list:
        """Token ids of consecutive ``(text, trusted)`` segments (or ``(id, None)``): the text is split at the
        special tokens of trusted segments only; everything between is encoded with special tokens as text."""
        ids, text = [], ""
        for piece, trusted in run:
            if trusted is None:
                ids += [piece]
                continue
            if not trusted:
                text += piece
                continue
            for j, part in enumerate(self._special_split.split(piece) if self._special_split else [piece]):
                if j % 2:  # a special token of the template
                    if text:
                        ids += self._plain.encode(text, add_special_tokens=False).ids
                    ids.append(self._special_ids[part])
                    text = ""
                else:
                    text += part
        if text:
            ids += self._plain.encode(text, add_special_tokens=False).ids
        return ids

    @functools.cached_property
    def _plain(self):
        """A copy of the tokenizer that encodes special-token strings as plain text."""
        return plain_tokenizer(self.tokenizer)

    @functools.cached_property
    def _special_ids(self) -> dict:
        return {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    @functools.cached_property
    def _special_split(self):
        if not self._special_ids:
            return None
        names = sorted(self._special_ids, key=len, reverse=True)  # longest first, as the tokenizer matches
        return re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    @functools.cached_property
    def _questions(self):
        from .question import QuestionEmbedder

        return QuestionEmbedder(self.marker, self._plain, self.decoder.embed, self.text)

    def question(self, prompt: str, batch: int) -> dict:
        """What a reducer that reads the question (cdpruner) is given: the user's words (image markers removed,
        special-token strings kept as text), embedded with the decoder's own table (or the artifact's CLIP text
        graph), the same rows for each of the ``batch`` images of the prompt (:class:`QuestionEmbedder`)."""
        return self._questions.arrays(prompt, batch)

    def build_prompt(self, images: Sequence[ImageLike], prompt: str, template: bool, clock: Stopwatch, visual=None):
        """(inputs_embeds [T, D], visual token counts) for one prompt: chunks, then images encoded (or ``visual``,
        each image's tokens computed elsewhere), then embedded."""
        if visual is not None:
            if images:
                raise InputError("give images or their visual tokens, not both")
            visual = [np.asarray(v, dtype=np.float32) for v in visual]
            if any(v.ndim != 2 or v.shape[1] != self.output_width or not len(v) for v in visual):
                raise InputError(f"visual tokens must be non-empty [n, {self.output_width}] arrays, one per image")
            if not all(np.isfinite(v).all() for v in visual):
                raise InputError("visual tokens contain NaN or Inf")
        chunks = self.prompt_chunks(prompt, len(images) if visual is None else len(visual), template)
        if images and self.vision is None:
            raise InputError("this pipeline was opened without its vision graph: pass visual_tokens")
        if images and len(images) > self.vision.batch_max:
            raise InputError(f"{len(images)} images exceed this artifact's batch limit of {self.vision.batch_max}")
        visual = visual or []
        if images:
            with clock.timed("preprocess"):
                pixels = preprocess_batch(list(images), self.vision.preprocess)
            question = self.question(prompt, len(images)) if self.vision.needs_question else None
            with clock.timed("vision"):
                out = self._vision(pixels, question)
            visual = [out.image(b).astype(np.float32) for b in range(len(images))]
        with clock.timed("embed"):
            parts = [visual[c.image] if c.kind == "image" else self.decoder.embed(list(c.ids)) for c in chunks]
            embeds = np.concatenate(parts, axis=0)
        if embeds.shape[0] >= self.decoder.context_length:
            raise InputError(f"the prompt needs {embeds.shape[0]} positions (visual tokens included) but the model's context is {self.decoder.context_length}")
        return embeds, [int(v.shape[0]) for v in visual]

    TOWER_CACHE = 4  # images whose patch outputs are kept for another question (LLaVA-7B: 9.4 MB each)

    def _vision(self, pixels: np.ndarray, question: dict | None):
        """The vision graph's tokens for ``pixels``. A question-reading graph with a reducer graph runs the tower
        once per image: the patch outputs of the last few images are kept (keyed by their pixels' bytes), and another
        question on one of them runs the reducer graph alone."""
        if (question is None or self.vision.reducer is None or not self.TOWER_CACHE
                or len(pixels) > self.vision.batch_max):
            return self.vision.run_pixels(pixels, question)
        import hashlib

        key = hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()
        with self._towers_lock:
            patches = self._towers.pop(key, None)
        if patches is None:
            out, patches = self.vision.run_keeping_patches(pixels, question)
        else:
            out = self.vision.reduce_patches(patches, question)
        with self._towers_lock:  # callers on several threads share the cache
            self._towers[key] = patches  # most recent last
            while len(self._towers) > self.TOWER_CACHE:
                self._towers.pop(next(iter(self._towers)))
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, images: ImageLike | Sequence[ImageLike] | None, prompt: str, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (), stream: bool = False,
                 seed: int | None = None, template: bool = True, positions: str = "contiguous", visual_tokens=None,
                 sampling: SamplingParams | None = None):
        """Generate an answer. ``stream=True`` returns an iterator of text pieces whose ``result`` attribute
        holds the :class:`GenerationResult` once exhausted; otherwise the result itself. ``sampling`` replaces the
        five sampling keywords (``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``)."""
        if positions not in POSITIONS:
            raise ConfigError(
                f"positions={positions!r} is not available: this decoder (onnxruntime-genai, GroupQueryAttention with fused "
                "rotary) derives positions from the attention mask, so visual tokens get contiguous positions"
            )
        if sampling is None:
            sampling = SamplingParams(max_new_tokens, temperature, top_p, stop, seed)
        elif (max_new_tokens, temperature, top_p, tuple(stop), seed) != (128, 0.0, 1.0, (), None):
            raise ConfigError("give the sampling keywords or sampling=SamplingParams(...), not both (the keywords "
                              "would be ignored)")
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        stream_obj = _Stream(self, list(images), prompt, sampling, template, visual_tokens)
        if stream:
            return stream_obj
        for _ in stream_obj:
            pass
        return stream_obj.result


class _Stream:
    """Iterator over decoded text pieces; ``result`` is set when generation ends."""

    def __init__(self, pipeline, images, prompt: str, sampling: SamplingParams, template: bool, visual=None):
        self.result: GenerationResult | None = None
        self._iter = self._run(pipeline, images, prompt, sampling, template, visual)

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def close(self) -> None:
        """Stop generating (a cancelled request): no further decode step runs; ``result`` stays None."""
        self._iter.close()

    def _run(self, pipeline, images, prompt: str, sampling: SamplingParams, template: bool, visual_tokens):
        max_new_tokens, stop = sampling.max_new_tokens, sampling.stop
        clock = Stopwatch()
        start = time.perf_counter()
        embeds, visual = pipeline.build_prompt(images, prompt, template, clock, visual=visual_tokens)
        room = pipeline.decoder.context_length - embeds.shape[0]
        budget = min(max_new_tokens, room)
        rng = np.random.default_rng(sampling.seed)
        eos = set(pipeline.spec.eos_token_ids or [])
        with clock.timed("prefill"):
            cache = pipeline.decoder.start(capacity=embeds.shape[0] + budget)
            logits, cache = pipeline.decoder.step(embeds, cache)
        ttft = (time.perf_counter() - start) * 1e3
        generated, emitted, reason, steps = [], "", "max_new_tokens", 0
        decode_start = time.perf_counter()
        while True:
            token = choose_token(logits, sampling.temperature, sampling.top_p, rng)
            if token in eos:
                reason = "eos"
                break
            generated.append(token)
            text = pipeline.tokenizer.decode(generated, skip_special_tokens=True)
            hit = next((s for s in stop if s and s in text), None)
            if hit is not None:
                text = text[: text.index(hit)]
                reason = "stop_string"
            safe = text if hit is not None else text[: len(text) - _stop_prefix(text, stop)]
            if len(safe) > len(emitted) and not safe.endswith("\ufffd"):
                yield safe[len(emitted):]  # never the start of a stop string that the next tokens may complete
                emitted = safe
            if hit is None and len(generated) >= budget:
                reason = "max_new_tokens" if budget == max_new_tokens else "context"
            if hit is not None or len(generated) >= budget:
                break
            logits, cache = pipeline.decoder.step(pipeline.decoder.embed([token]), cache)
            steps += 1
        decode_ms = (time.perf_counter() - decode_start) * 1e3
        timings = {**{k: round(v, 3) for k, v in clock.ms.items()}, "ttft": round(ttft, 3), "decode": round(decode_ms, 3),
                   "total": round((time.perf_counter() - start) * 1e3, 3)}
        timings["decode_ms_per_token"] = round(decode_ms / steps, 3) if steps else None
        timings["tokens_per_s"] = round(1e3 * steps / decode_ms, 2) if steps and decode_ms > 0 else None
        final = emitted if reason == "stop_string" else pipeline.tokenizer.decode(generated, skip_special_tokens=True)
        if len(final) > len(emitted) and final.startswith(emitted):
            yield final[len(emitted):]  # flush what was held back (an incomplete multi-byte character)
        self.result = GenerationResult(final, generated, visual, int(embeds.shape[0]), len(generated), reason, timings,
                                       pipeline.method)


def _stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins a stop string: held back from the stream until the next
    tokens show whether the stop string follows (the answer must end before it, streamed or returned)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _graph_for(method: str | None) -> str:
    if method in (None, "", "default"):
        return "vision"
    if method == "none":
        return "baseline"
    raise ConfigError(f"method override {method!r} is not available at run time; only 'none' (the baseline graph)")
