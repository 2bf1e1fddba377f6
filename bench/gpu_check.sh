#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: every GPU test (onnxruntime CUDA parity, TensorRT build + parity for
# the padded and dynamic contracts, FP32 / strongly typed FP16 / INT8, timing-cache reuse, engine-mismatch refusal)
# and the GPU benchmarks (vision graph latency at batch 1 and 8 for torch CUDA, onnxruntime CUDA, TensorRT FP16 and
# INT8; reducer share; pipeline TTFT), then one report. Without a GPU it says so and exits 0.
# Usage: bash bench/gpu_check.sh [report.json]   (needs: pip install -e ".[export,test,gpu,trt]")
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-gpu-check.json}"
if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_check: no GPU here (nvidia-smi finds none): nothing to run; the GPU tests skip in the normal suite"
  exit 0
fi
nvidia-smi -L
python - <<'PY'
import importlib.util
for name in ("tensorrt", "polygraphy", "onnxruntime"):
    print(f"{name}: {'present' if importlib.util.find_spec(name) else 'MISSING'}")
import onnxruntime as ort
print("onnxruntime providers:", ort.get_available_providers())
PY
status=0
python -m pytest -q -m "gpu or tensorrt" -rs tests/test_tensorrt.py -s 2>&1 | tee gpu-tests.log || status=1
python bench/bench_gpu.py --json "$report" || status=1
echo "GPU check report: tests $( [ $status -eq 0 ] && echo passed || echo FAILED ), benchmarks in $report"
exit $status
