#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: every GPU test (onnxruntime CUDA parity, TensorRT build + parity for
# the padded and dynamic contracts, FP32 / strongly typed FP16 / INT8, timing-cache reuse, engine-mismatch refusal)
# and the GPU benchmarks (vision graph latency at batch 1 and 8 for torch CUDA, onnxruntime CUDA, TensorRT FP16 and
# INT8; reducer share; pipeline TTFT), then one report. Without a GPU it says so and exits 0.
# The torch-CUDA rows (reducer on CUDA vs CPU, real DINOv2-S parity per precision, reduction stage, reducer memory)
# need only torch with CUDA; the onnxruntime-gpu and TensorRT rows say why they skip when those are missing.
# Usage: bash bench/gpu_check.sh [report.json [bench_gpu.py options...]]   (needs: pip install -e ".[export,test,gpu,trt]")
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-gpu-check.json}"
shift || true
python="${PYTHON:-python3}"
if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_check: no GPU here (nvidia-smi finds none): nothing to run; the GPU tests skip in the normal suite"
  exit 0
fi
nvidia-smi -L
"$python" - <<'PY'
import importlib.util
for name in ("torch", "tensorrt", "polygraphy", "onnxruntime"):
    print(f"{name}: {'present' if importlib.util.find_spec(name) else 'MISSING'}")
import onnxruntime as ort
print("onnxruntime providers:", ort.get_available_providers())
PY
status=0
# one pytest per file: a file that cannot be collected here (a missing build dependency) does not stop the other
for tests in tests/test_reduce.py tests/test_tensorrt.py; do
  "$python" -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" -rs "$tests" 2>&1 | tee -a gpu-tests.log || status=1
done
"$python" bench/bench_gpu.py --json "$report" "$@" || status=1
echo "GPU check report: tests $( [ $status -eq 0 ] && echo passed || echo FAILED ), benchmarks in $report"
exit $status
