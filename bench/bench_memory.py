"""Memory beside llama.cpp: the demo's whole runtime (vision graph + reducer + int4 decoder, as `run` loads them)
against llama.cpp holding the same SmolLM2-135M GGUF, each in a fresh process, peak resident memory after a context
of 620 and 2000 positions, and the bytes each loads from disk.

Each measurement is its own child process (``VmHWM``, the process's high-water mark, is per process image): our side
opens the artifact with ``Pipeline.from_artifacts`` and answers one question about one image whose prompt carries
enough text to reach the context (the visual tokens included); llama.cpp's side (llama-cpp-python, a bench
dependency: see ``bench_llamacpp.py`` for its build flags) evaluates the same number of token ids with ``n_ctx``
sized to it, as a user of llama.cpp would. Both generate 8 tokens greedily after the context. llama.cpp has no
vision here (no mmproj GGUF for the demo's DINOv2-S exists), so its figure is the LLM alone: the comparison is
conservative for llama.cpp.

Usage: python bench/bench_memory.py [--artifact /tmp/prumerge-answers/demo] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTEXTS = (620, 2000)
NEW_TOKENS = 8

OURS = r"""
import json, sys
from pathlib import Path
import numpy as np
from prumerge.latency.stats import peak_rss_mb
from prumerge.runtime.pipeline import Pipeline, SamplingParams
artifact, context, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pipeline = Pipeline.from_artifacts(artifact, llm_threads=threads)
image = np.zeros((224, 224, 3), dtype=np.uint8); image[60:160, 60:160] = (220, 30, 30)
words, text = 0, "What colour is the square?"
while True:  # pad the question until the whole prompt (visual tokens included) reaches the context
    prompt = "<image>\n" + " ".join(["the"] * words) + " " + text
    result = pipeline.generate(image, prompt, sampling=SamplingParams(1))
    if result.prompt_tokens >= context or words > 4 * context:
        break
    words += max(1, context - result.prompt_tokens)
result = pipeline.generate(image, prompt, sampling=SamplingParams(%d))
print(json.dumps({"positions": result.prompt_tokens + result.generated_tokens, "peak_rss_mb": peak_rss_mb()}))
""" % NEW_TOKENS

THEIRS = r"""
import json, sys
from llama_cpp import Llama
from prumerge.latency.stats import peak_rss_mb
gguf, context, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=gguf, n_ctx=context + %d + 8, n_batch=1024, n_threads=threads, n_threads_batch=threads,
            verbose=False)
ids = [100 + i %% 1000 for i in range(context)]
llm.eval(ids)
import numpy as np
vocab = llm.n_vocab()
for _ in range(%d):
    token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
    llm.eval([token])
print(json.dumps({"positions": context + %d, "peak_rss_mb": peak_rss_mb()}))
""" % (NEW_TOKENS, NEW_TOKENS, NEW_TOKENS)


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=Path("/tmp/prumerge-answers/demo"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("skipped: llama-cpp-python is not installed (a bench dependency; see bench/bench_llamacpp.py)")
    from prumerge.artifact.manifest import Manifest
    from prumerge.demovlm.smollm2 import SMOLLM2_GGUF, smollm2_folder
    from prumerge.latency.memory import artifact_parts, kv_cache_mb

    gguf = Path(smollm2_folder()) / SMOLLM2_GGUF
    manifest = Manifest.read(args.artifact)
    parts = artifact_parts(manifest, manifest.vision)
    print(f"on disk: ours {sum(parts.values()):.1f} MB ({', '.join(f'{k} {v:.1f}' for k, v in parts.items())}); "
          f"llama.cpp's GGUF {gguf.stat().st_size / (1 << 20):.1f} MB")
    print(f"\n| positions | ours: peak RSS MB (vision + LLM) | llama.cpp: peak RSS MB (LLM alone) | ours / llama.cpp | "
          f"our KV cache MB ({manifest.llm.kv_dtype}) |")
    print("|---:|---:|---:|---:|---:|")
    for context in CONTEXTS:
        ours = child(OURS, str(args.artifact), str(context), str(args.threads))
        theirs = child(THEIRS, str(gguf), str(context), str(args.threads))
        print(f"| {ours['positions']} / {theirs['positions']} | {ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | "
              f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x | {kv_cache_mb(manifest.llm, ours['positions']):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
