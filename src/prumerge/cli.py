"""``prumerge-export``: a thin click layer. Each command parses options, calls one library function, prints.

Imports of torch-heavy modules happen inside the commands, so ``--help`` and torch-free commands start fast.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import PruMergeError
from .artifact.contract import CONTRACTS, PLAIN_OPSET
from .artifact.manifest import Int8Record
from .export.options import KV_CACHES, LLM_PRECISIONS, LLM_PROVIDERS
from .export.tensorrt import PRECISIONS as ENGINE_PRECISIONS, TARGETS as ENGINE_TARGETS
from .reduce import registry
from .runtime.vision import PROVIDERS

PROVIDER = click.Choice(tuple(PROVIDERS))  # the runtime's execution providers


# what `pip install prumerge[export]` adds; the runtime-only install lacks them
BUILD_SIDE_MODULES = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "onnxslim", "onnxruntime_genai",
                      "huggingface_hub", "peft")


class _Group(click.Group):
    """Turns every PruMergeError into one line on stderr and its exit code, instead of a traceback."""

    def invoke(self, ctx):
        import signal
        import threading

        from .export.staging import request_stop

        def terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C: staging directories are removed on the way out
            request_stop(128 + signum)  # and is remembered, in case Python drops the exit (see request_stop)
            raise SystemExit(128 + signum)

        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, terminate)
        try:
            return super().invoke(ctx)
        except PruMergeError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted", fg="red", err=True)
            sys.exit(130)
        except ModuleNotFoundError as exc:  # a build-side command in a runtime-only install
            root = (getattr(exc, "name", None) or "").split(".")[0]
            if root not in BUILD_SIDE_MODULES:
                raise
            command = ctx.invoked_subcommand or "this command"
            click.secho(f"error: `prumerge-export {command}` needs the build side ({root} is not installed): "
                        "pip install 'prumerge[export]'", fg="red", err=True)
            sys.exit(8)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prumerge-export")
def main() -> None:
    """Export LLaVA-style vision towers with the PruMerge / PruMerge+ token reducer inside the graph."""


class _Fraction(click.FloatRange):
    """A number in (0, 1]; NaN, which every range comparison lets through, is refused too."""

    def convert(self, value, param, ctx):
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a number in (0, 1]", param, ctx)
        return number


FRACTION = _Fraction(0, 1, min_open=True)


def _outputs(*outputs, inputs=(), folders=(), pictures=()) -> None:
    """Refuse, before any work, an output that cannot be written, would overwrite an input of the command or lands
    in an artifact (``prumerge.outputs``)."""
    from .outputs import check_outputs

    check_outputs(outputs, inputs, folders, pictures)


def engine_tuning_options() -> list:
    """TensorRT engine options shared by ``build`` and ``engine``; unset ones take the target's defaults."""
    return [
        click.option("--precision", type=click.Choice(ENGINE_PRECISIONS), default=None, help="engine precision"),
        click.option("--workspace", type=int, default=None, help="builder workspace, MiB"),
        *(click.option(f"--{bound}-batch", type=int, default=None) for bound in ("min", "opt", "max")),
        click.option("--opt-question-rows", type=int, default=None, help="cdpruner: question tokens the engine is tuned for"),
        click.option("--max-question-rows", type=int, default=None, help="cdpruner: the longest question (default 256)"),
        click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="TensorRT timing cache file (read and updated)"),
    ]


def image_size_option():
    return click.option("--image-size", type=int, default=None,
                        help="square input side in px (default: the checkpoint's processor crop, else its config); "
                             "position embeddings are interpolated to it")


def _decorate_with(options):
    """Apply a list of click options (in listed order) as one decorator."""
    return lambda func: functools.reduce(lambda f, d: d(f), reversed(options()), func)


def reducer_options() -> list:
    """Every registered method's options as flags (``prumerge.reduce.registry``: declared once, in the method's
    module); their values are checked by ``ReducerConfig``, so a bad one is one line naming the option."""
    out = []
    for spec in registry.options().values():
        kind = click.Choice(spec.choices) if spec.choices else spec.kind
        out.append(click.option(spec.flag, spec.name, type=kind, default=getattr(spec.default, "value", spec.default),
                                show_default=True, help=spec.help))
    return out


def build_options(func):
    """Options shared by ``build`` and ``demo`` (one definition, so the two cannot drift)."""
    return _decorate_with(lambda: [
        click.option("--method", type=click.Choice(registry.names()), default="prumerge", show_default=True,
                     help="; ".join(f"{name}: {spec.help}" for name, spec in registry.specs().items())),
        click.option("--output", type=click.Choice(CONTRACTS), default="padded", show_default=True,
                     help="padded: static [B, K_max, D] (TensorRT 10.3 / JetPack 6); dynamic: token axis trimmed to the batch's longest count"),
        click.option("--max-tokens", type=int, default=None, help="capacity K_max (default: enough for the method on this grid)"),
        click.option("--opset", type=int, default=PLAIN_OPSET, show_default=True,
                     help="ONNX opset of the vision graph; 23 or later writes attention as ONNX's fused Attention op "
                          "(onnxruntime >= 1.23, not TensorRT 10.3)"),
        click.option("--fp16", is_flag=True, help="export fp16 weights (the reducer still computes in fp32)"),
        click.option("--batch-max", type=int, default=16, show_default=True, help="largest batch the graph accepts"),
        *reducer_options(),
        click.option("--llm-precision", type=click.Choice(LLM_PRECISIONS), default=None,
                     help="language model precision (default: int4 for LLaVA checkpoints)"),
        click.option("--llm-provider", type=click.Choice(LLM_PROVIDERS), default="cpu", show_default=True,
                     help="execution provider the LLM is built for"),
        click.option("--llm-kv-cache", type=click.Choice(KV_CACHES), default="auto", show_default=True,
                     help="mixed: int8, calibrated per channel, the first step's attention in float (float's prefill, "
                          "int8's decode); int8: every step int8; float: the builder's; auto: mixed on the CPU provider"),
        click.option("--no-llm", is_flag=True, help="vision graph only"),
        click.option("--baseline", is_flag=True, help="also export the unreduced (method none) graph for comparisons"),
        click.option("--target", type=click.Choice(ENGINE_TARGETS), default=None,
                     help="TensorRT target: writes build_engine.sh with the target's safe defaults"),
        click.option("--engine", is_flag=True, help="also build vision.engine here (needs TensorRT and the target GPU)"),
        *engine_tuning_options(),
        click.option("--calibration", type=click.Path(path_type=Path), default=None,
                     help="calibration file from `calibrate`: sets the capacity; with --precision int8, the INT8 image set"),
        click.option("--calibration-method", type=click.Choice(Int8Record.METHODS), default="minmax", show_default=True,
                     help="INT8 activation scales: static over the calibration set (Q/DQ), or per-token at run time "
                          "(onnxruntime only; keeps the selection closest)"),
        click.option("--int8-float-layers", type=click.IntRange(0), default=0, show_default=True,
                     help="INT8: keep the tower's last K encoder layers float (K=1: what feeds token selection)"),
        click.option("--int8-target-jaccard", type=FRACTION, default=None,
                     help="INT8: keep float the fewest tower parts (patch embedding, encoder layers), most harmful "
                          "first (each measured quantised alone on the calibration set), that keep this mean Jaccard "
                          "of fp32's selection"),
        click.option("--no-slim", is_flag=True, help="skip the onnxslim simplification pass"),
        image_size_option(),
        click.option("--force", is_flag=True, help="replace an existing output directory"),
    ])(func)


def _options_from(kwargs, base: str | None = None, vision_tower: str | None = None, text_encoder: str | None = None):
    """The build's typed stages from the command line's flags (``export.options.from_flags``: one mapping)."""
    from .export.options import from_flags

    context = click.get_current_context()  # which flags were left at their default (from_flags says why it asks)
    defaulted = frozenset(n for n in kwargs if context.get_parameter_source(n) is click.core.ParameterSource.DEFAULT)
    return from_flags(kwargs, base, vision_tower, text_encoder, defaulted)


def _build(model: str, out: Path, options, force: bool):
    from rich.console import Console

    from .export.build import build_artifact

    console = Console(stderr=True)
    with console.status("starting") as status:
        return build_artifact(model, out, options, force=force, progress=lambda m: (status.update(m), console.log(m)))


def _print_manifest_summary(manifest, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"artifact {out}", show_header=False)
    for label, text in manifest.summary_rows():
        table.add_row(label, text)
    Console().print(table)


@main.command()
@click.argument("model")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="artifact directory to write")
@click.option("--revision", default=None, help="hub revision (branch, tag or commit)")
@click.option("--no-project", is_flag=True, help="stop before the LLaVA projector (tokens in vision width)")
@click.option("--base", default=None, help="original-layout LoRA checkpoint: its base LLM (dir or hub id)")
@click.option("--vision-tower", default=None, help="original-layout checkpoint: the CLIP tower (default: its mm_vision_tower)")
@click.option("--text-encoder", default=None, help="cdpruner: the full CLIP (dir or hub id) the tower is from; its text "
              "model embeds the question as the released code does (--relevance-sign defaults to negated then)")
@build_options
def build(model, out, force, base, vision_tower, text_encoder, **kwargs):
    """Export MODEL (hub id like llava-hf/llava-1.5-7b-hf, or a local checkpoint: llava-hf, CLIP, DINOv2, SigLIP,
    or original LLaVA layout, merged or LoRA) to an artifact directory."""
    options = _options_from(kwargs, base, vision_tower, text_encoder)
    _print_manifest_summary(_build(model, out, options, force), out)


@main.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="llava-hf checkpoint directory to write")
@click.option("--base", default=None, help="LoRA checkpoints: the base LLM (dir or hub id), e.g. lmsys/vicuna-7b-v1.5")
@click.option("--vision-tower", default=None, help="the CLIP tower (dir or hub id); default: the config's mm_vision_tower")
@click.option("--force", is_flag=True, help="replace an existing output directory")
def convert(source, out, base, vision_tower, force):
    """Convert SOURCE (original LLaVA layout: merged, or LoRA like the released PruMerge checkpoints) to a
    llava-hf checkpoint in OUT."""
    from .export.convert import convert_llava_original
    from .export.staging import staged_directory

    with staged_directory(out, force=force, kind="checkpoint", inputs=(source, base, vision_tower)) as stage:
        facts = convert_llava_original(source, stage, base=base, vision_tower=vision_tower,
                                       progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(facts | {"out": str(out)}, indent=2))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="directory for the Triton repository")
@click.option("--instances", type=int, default=1, show_default=True, help="vision model instances per device")
@click.option("--llm-instances", type=int, default=1, show_default=True,
              help="language-model instances: answers decoded at the same time")
@click.option("--max-inflight", type=int, default=16, show_default=True,
              help="requests the entry model works on at once (more wait for a slot)")
@click.option("--max-batch", type=int, default=None, help="vision model max_batch_size (default: the graph's batch limit)")
@click.option("--max-queue-delay-us", type=int, default=2000, show_default=True, help="dynamic batcher wait")
@click.option("--preferred-batch", type=int, multiple=True, help="preferred batch size (repeatable)")
@click.option("--ort-tensorrt", is_flag=True, help="GPU config: onnxruntime backend with the TensorRT accelerator")
@click.option("--force", is_flag=True, help="replace a repository prumerge wrote before")
def triton(artifact, out, instances, llm_instances, max_inflight, max_batch, max_queue_delay_us, preferred_batch, ort_tensorrt,
           force):
    """Write a Triton Inference Server model repository for ARTIFACT (vision model with dynamic batching, streaming
    LLM, BLS entry model; GPU configs plus configs/cpu.pbtxt for --model-config-name=cpu)."""
    from .triton.repository import TritonOptions, write_repository

    options = TritonOptions(instances=instances, llm_instances=llm_instances, max_inflight=max_inflight, max_batch=max_batch,
                            max_queue_delay_us=max_queue_delay_us, preferred_batch=tuple(preferred_batch),
                            ort_tensorrt=ort_tensorrt)
    facts = write_repository(artifact, out, options, force=force)
    click.echo(json.dumps(facts, indent=2))
    import shlex

    click.echo(f"serve it: {shlex.join(['tritonserver', '--model-repository', str(facts['model_repository'])])}  "
               "(CPU: add --model-config-name=cpu)", err=True)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(ENGINE_TARGETS), default="server", show_default=True)
@_decorate_with(engine_tuning_options)
def engine(directory, target, **kwargs):
    """Build DIRECTORY's TensorRT engine on this machine (run it on the device that will use the engine)."""
    from .export.tensorrt import EngineOptions, add_engine_to_artifact

    from .export.tensorrt import engine_overrides

    overrides = {k: v for k, v in engine_overrides(kwargs).items() if v is not None}
    facts = add_engine_to_artifact(directory, EngineOptions.for_target(target, **overrides))
    click.echo(json.dumps(facts, indent=2))



@main.command()
@click.argument("images", required=False, type=click.Path(path_type=Path))
@click.option("--model", required=True, help="checkpoint dir or hub id")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("calibration.json"), show_default=True)
@click.option("--synthetic", type=int, default=0, help="use N generated images instead of a folder")
@click.option("--limit", type=int, default=None, help="sample at most N images (seeded)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--methods", default="prumerge,prumerge+", show_default=True)
@click.option("--coverage", type=click.FloatRange(0, 1, min_open=True), default=0.999, show_default=True, help="share of images the capacity holds untruncated")
@click.option("--histogram", type=click.Path(path_type=Path), default=None, help="histogram PNG of the counts")
@click.option("--report", is_flag=True, help="also quantise the vision graph to INT8 and compare it with fp32 on the set")
@click.option("--report-json", type=click.Path(path_type=Path), default=None)
@click.option("--calibration-method", type=click.Choice(Int8Record.METHODS), default="minmax", show_default=True)
@click.option("--int8-target", type=click.Choice(Int8Record.TARGETS), default="cpu", show_default=True)
@click.option("--int8-target-jaccard", type=FRACTION, default=None,
              help="--report: keep float the fewest tower parts that reach this mean Jaccard (as build does)")
@image_size_option()
def calibrate(images, model, out, synthetic, limit, seed, methods, coverage, histogram, report, report_json,
              calibration_method, int8_target, int8_target_jaccard, image_size):
    """Token counts per method over IMAGES (a folder), the capacity for --coverage, and an optional INT8 report."""
    from rich.console import Console
    from rich.table import Table

    from .calib.budget import calibrate_budget, histogram as draw_histogram
    from .calib.images import CalibrationSet

    if images is None and not synthetic:
        raise click.UsageError("give an image folder or --synthetic N")
    if synthetic < 0:
        raise click.BadParameter(f"must be >= 0, got {synthetic}", param_hint="--synthetic")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if not method_list:
        raise click.BadParameter("give at least one method (prumerge, prumerge+)", param_hint="--methods")
    dataset = CalibrationSet.from_folder(images, limit, seed) if images is not None else CalibrationSet.synthetic(synthetic, seed)
    # checked before the model pass, not after it; never onto the images read, the folder or the model
    _outputs(("--out", out), ("--histogram", histogram), ("--report-json", report_json), pictures=("--histogram",),
             inputs=[images, Path(model), *(sorted(Path(images).rglob("*")) if images is not None and Path(images).is_dir() else ())])
    for item in dataset.skipped:
        click.secho(f"skipped {item['file']}: {item['reason']}", fg="yellow", err=True)
    budget = calibrate_budget(model, dataset, method_list, coverage, image_size=image_size)
    budget.write(out)
    table = Table(title=f"{len(dataset.images)} images ({len(dataset.skipped)} skipped), {budget.num_patches} patches")
    for column in ("method", "mean", "p50", "p90", "p99", "max", f"capacity @ {coverage:g}", "default capacity"):
        table.add_column(column, justify="right")
    for method, data in budget.methods.items():
        st = data["stats"]
        table.add_row(method, f"{st['mean']:.1f}", f"{st['p50']:.0f}", f"{st['p90']:.0f}", f"{st['p99']:.0f}", str(st["max"]),
                      str(data["capacity"]), str(data["default_capacity"]))
    Console().print(table)
    click.echo(f"wrote {out}", err=True)
    if histogram:
        click.echo(f"wrote {draw_histogram(budget, histogram)}", err=True)
    if report:
        from .export.int8_report import int8_report

        results = {}
        for method in budget.methods:
            record = results[method] = int8_report(model, dataset, method, calibration_method, int8_target,
                                                   image_size=image_size, target_jaccard=int8_target_jaccard,
                                                   log=lambda line: click.echo(f"  {line}", err=True))
            click.echo(f"INT8 vs FP32 ({method}): {record.line()}, mean |count diff| "
                       f"{record.agreement.mean_count_diff:.2f}, latency fp32/int8 {record.agreement.latency_ratio:.2f}x")
        if report_json:
            report_json.write_text(json.dumps({m: r.to_dict() for m, r in results.items()}, indent=2) + "\n")
            click.echo(f"wrote {report_json}", err=True)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--images", type=int, default=4, show_default=True, help="synthetic images to compare on")
@click.option("--provider", type=PROVIDER, default="cpu", show_default=True)
@click.option("--no-reference", is_flag=True, help="skip the PyTorch comparison (source checkpoint not at hand)")
@click.option("--expect-sha256", default=None, help="the manifest hash the builder published: refuse any other artifact")
def verify(directory, images, provider, no_reference, expect_sha256):
    """Re-hash DIRECTORY's files and compare its graph on onnxruntime with the PyTorch reference."""
    from .export.verify import verify_artifact

    report = verify_artifact(directory, images=images, provider=provider, reference=not no_reference, expect_sha256=expect_sha256)
    click.echo(json.dumps(report, indent=2))
    click.secho("verify: OK", fg="green", err=True)


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="artifact: print the full summary as JSON")
@click.option("--model", default=None, help="image: checkpoint dir, hub id or artifact dir whose tower to use")
@click.option("--method", type=click.Choice([n for n, spec in registry.specs().items() if spec.explain]),
              default="prumerge", show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), default=None, help="image: PNG to write")
@click.option("--question", default=None, help="image: the question (a method that reads it, with an artifact --model)")
@image_size_option()
def inspect(target, as_json, model, method, out, image_size, question):
    """TARGET an artifact dir: print its manifest and graph summary. TARGET an image (with --model): draw the
    kept / sampled / merged patches and the CLS attention heat map to --out."""
    if target.is_dir():
        return _inspect_artifact(target, as_json)
    if model is None:
        raise click.UsageError("inspecting an image needs --model (a checkpoint, hub id or artifact directory)")
    from .heatmap import render

    out = out or target.with_name(f"{target.stem}.{method.replace('+', 'plus')}.png")
    _outputs(("--out", out), inputs=[target, Path(model)], pictures=("--out",))
    encoder = None
    from .artifact.manifest import MANIFEST_NAME, Manifest

    if Path(model).is_dir() and (Path(model) / MANIFEST_NAME).is_file():  # an artifact: the encoder it was built from
        from .export.reference import artifact_encoder

        if image_size is not None:
            raise click.BadParameter("an artifact has its own input size", param_hint="--image-size")
        encoder = artifact_encoder(Manifest.read(model), method=method, project=registry.get(method).projected,
                                   capacity=False)
    if question is not None:  # embedded as the runtime embeds it: the artifact's own tokenizer and table
        from .runtime.pipeline import Pipeline

        if encoder is None:
            raise click.BadParameter("the question is embedded with an artifact's LLM: give --model ARTIFACT")
        question = Pipeline.from_artifacts(model, with_vision=False).question(question, 1)
    result = render(target, model, method=method, out=out, image_size=image_size, encoder=encoder, question=question)
    click.echo(result.summary())
    click.echo(f"wrote {result.path} ({result.size[0]}x{result.size[1]})")


def _inspect_artifact(directory: Path, as_json: bool) -> None:
    from .export.verify import inspect_artifact

    info = inspect_artifact(directory)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(directory), show_header=False)
    for section in ("source", "reducer", "vision", "preprocess", "llm", "validation", "graph"):
        table.add_row(section, json.dumps(info[section]))
    for version, report in info["tensorrt"].items():
        table.add_row(f"TensorRT {version}", json.dumps({k: report[k] for k in ("ok", "unsupported", "violations", "data_dependent")}))
    table.add_row("files", json.dumps(info["files"]))
    Console(width=160).print(table)


@main.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--images", "images", multiple=True, type=click.Path(path_type=Path), help="image file (repeatable)")
@click.option("--synthetic", type=int, default=0, help="also use N generated images")
@click.option("--prompt", default="<image>\nDescribe the image.", show_default=True)
@click.option("--methods", default=None, help="comma-separated (default: every method the artifacts provide)")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--runs", type=int, default=5, show_default=True)
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--provider", type=PROVIDER, default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="write the report as JSON")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, help="write a stacked-bar PNG")
def profile(artifacts, images, synthetic, prompt, methods, warmup, runs, max_new_tokens, provider, json_out, plot_out):
    """Per-stage latency of the whole pipeline for each method, side by side, on the same images.

    Each method comes from the first ARTIFACT that has it (an artifact's own method; none from a --baseline build)."""
    from rich.console import Console
    from rich.progress import Progress

    from .latency import run as run_profile
    from .latency.report import plot, table, write_json
    from .latency.runner import resolve_methods

    _outputs(("--json", json_out), ("--plot", plot_out), inputs=[*images, *artifacts], pictures=("--plot",))
    method_list = list(resolve_methods(list(artifacts), [m.strip() for m in (methods or "").split(",") if m.strip()]))
    per_method = warmup + runs * (len(images) + synthetic)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("profiling", total=per_method * len(method_list))
        report = run_profile(list(artifacts), method_list, images=list(images), synthetic=synthetic, prompt=prompt,
                             warmup=warmup, runs=runs, provider=provider, max_new_tokens=max_new_tokens,
                             progress=lambda label, n: bar.update(task, advance=n, description=label))
    Console().print(table(report))
    if json_out:
        click.echo(f"wrote {write_json(report, json_out)}", err=True)
    if plot_out:
        click.echo(f"wrote {plot(report, plot_out)}", err=True)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, help="image file (repeat for several; one <image> marker each)")
@click.option("--prompt", required=True, help="the question; put <image> where each image goes")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--method-override", type=click.Choice(["none"]), default=None,
              help="none: the unreduced 576-token baseline graph (artifact built with --baseline)")
@click.option("--provider", type=PROVIDER, default="cpu", show_default=True)
@click.option("--raw", is_flag=True, help="send the prompt as is, without the model's chat template")
@click.option("--json", "as_json", is_flag=True, help="print answer, token counts and timings as JSON")
@click.option("--expect-sha256", default=None, help="the manifest hash the builder published: refuse any other artifact")
def run(directory, images, prompt, max_new_tokens, temperature, top_p, seed, stop, method_override, provider, raw, as_json,
        expect_sha256):
    """Answer PROMPT about the image(s) with the artifact in DIRECTORY (streams the answer)."""
    from .runtime.pipeline import Pipeline, SamplingParams

    sampling = SamplingParams(max_new_tokens, temperature, top_p, tuple(stop), seed)  # checked before the model loads
    pipeline = Pipeline.from_artifacts(directory, provider=provider, method=method_override, expect_sha256=expect_sha256)
    stream = pipeline.generate(list(images), prompt, sampling=sampling, stream=True, template=not raw)
    for piece in stream:
        if not as_json:
            click.echo(piece, nl=False)
    result = stream.result
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo()
    click.secho(result.summary(), fg="cyan", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (127.0.0.1: this machine only)")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--max-queue", type=click.IntRange(0, 10000), default=8, show_default=True,
              help="requests that may wait behind the running one; more are answered 429 with Retry-After")
@click.option("--images-dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="allow image_url paths inside this folder (default: data: URLs only)")
@click.option("--allow-remote-images", is_flag=True, help="fetch http(s) image URLs (refused by default)")
@click.option("--model-name", default=None, help="the model id clients see (default: the artifact folder's name)")
@click.option("--provider", type=PROVIDER, default="cpu", show_default=True)
@click.option("--expect-sha256", default=None, help="refuse the artifact unless its manifest has this sha256")
def serve(artifact, host, port, max_queue, images_dir, allow_remote_images, model_name, provider, expect_sha256):
    """Serve ARTIFACT with OpenAI's chat-completions API (POST /v1/chat/completions, GET /v1/models, GET /health)."""
    from .serve.app import serve as run_server
    from .serve.openai_api import ImagePolicy

    click.echo(f"serving {artifact} on http://{host}:{port}/v1 (OpenAI chat completions)", err=True)
    run_server(artifact, host=host, port=port, max_queue=max_queue, model_name=model_name, provider=provider,
               expect_sha256=expect_sha256, policy=ImagePolicy(images_dir=images_dir, allow_remote=allow_remote_images))


@main.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--questions", required=True, type=click.Path(path_type=Path),
              help="LLaVA question file (JSON lines: question_id, image, text, optional answer, category)")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="image folder (default: the question file's)")
@click.option("--methods", default=None, help=f"comma-separated: {','.join(registry.specs())} (default: all the artifacts provide)")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("evaluation"), show_default=True,
              help="folder for the answer files (LLaVA format, one per configuration); a rerun resumes from them")
@click.option("--limit", type=int, default=None, help="the first N questions only")
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--provider", type=PROVIDER, default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="write the summary as JSON")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, help="write accuracy vs TTFT as PNG")
@click.option("--ttft-budget-ms", type=float, default=None, help="choose: the most accurate configuration within this median TTFT")
@click.option("--min-accuracy-ratio", type=float, default=None, help="choose: the fastest keeping this share of full-token accuracy")
def evaluate(artifacts, questions, images, methods, out, limit, max_new_tokens, provider, json_out, plot_out,
             ttft_budget_ms, min_accuracy_ratio):
    """Accuracy, agreement with full tokens, visual tokens and latency of each configuration (ARTIFACTS x methods)
    on a question file; optionally choose the cheapest configuration that meets a budget."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .evaluate import budget, report as eval_report
    from .evaluate.runner import configurations, evaluate as run_evaluation

    method_list = [m.strip() for m in (methods or "").split(",") if m.strip()] or None
    if methods is not None and not method_list:
        raise click.BadParameter("give at least one method", param_hint="--methods")
    configs = configurations(list(artifacts), method_list)
    budget.check_request(ttft_budget_ms, min_accuracy_ratio, [c.method for c in configs])  # before any answer
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tasks = {}

        def advance(label, n):
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=None)
            bar.update(tasks[label], advance=n)

        result = run_evaluation(list(artifacts), questions, images, method_list, out, provider, max_new_tokens, limit,
                                progress=advance, reports=(("--json", json_out), ("--plot", plot_out)))
    rows = result["configurations"]
    console = Console()
    console.print(eval_report.table(rows, title=f"{questions}: {result['question_count']} questions, {len(configs)} configurations"))
    if any(r.get("by_category") for r in rows):
        console.print(eval_report.category_table(rows))
    click.echo(f"answer files (LLaVA format): {', '.join(result['answer_files'].values())}", err=True)
    if ttft_budget_ms is not None or min_accuracy_ratio is not None:
        chosen = budget.choose(rows, ttft_budget_ms, min_accuracy_ratio)
        result["chosen"] = {"configuration": chosen["configuration"], "build_command": budget.build_command(chosen)}
        click.echo(f"chosen: {chosen['configuration']} (accuracy {chosen['accuracy']:.3f}, median TTFT "
                   f"{chosen['ttft_ms']['p50']:.0f} ms, {chosen['visual_tokens']['mean']:.1f} visual tokens)")
        click.echo(f"build it: {result['chosen']['build_command']}")
    if json_out:
        click.echo(f"wrote {eval_report.write_json(result, json_out)}", err=True)
    if plot_out:
        click.echo(f"wrote {eval_report.plot(rows, plot_out)}", err=True)


@main.command()
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("artifacts/demo"), show_default=True)
@click.option("--scenes", type=click.IntRange(1, 32), default=4, show_default=True, help="generated images to ask about")
@click.option("--max-new-tokens", type=int, default=8, show_default=True)
@build_options
def demo(out, force, scenes, max_new_tokens, **kwargs):
    """Build the demo VLM (real DINOv2-S + trained projector/LoRA + real SmolLM2) and ask it about generated images
    it never trained on, with and without PruMerge, beside the right answers."""
    from .demo import run_demo
    from .demovlm.assemble import DESCRIPTION

    click.secho(DESCRIPTION, fg="yellow", err=True)
    options = _options_from(kwargs)
    if options.llm is None:
        raise click.BadParameter("the demo answers questions: it needs its LLM", param_hint="--no-llm")
    run_demo(Path(out), options, force, scenes, max_new_tokens, build=_build,
             show_manifest=_print_manifest_summary, echo=click.echo)
    click.secho("held-out accuracy over hundreds of questions: `prumerge-export evaluate` (README, \"Answers\")",
                fg="yellow", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
