#!/usr/bin/env bash
# The whole GPU check in one go, for the first machine with an NVIDIA GPU (10 minutes at most):
#   1. stop at once, with a message, when there is no GPU;
#   2. build xlsparse._C in place with its CUDA kernels, unless the tree already has them
#      (nothing is pip-installed: the machine's python3, torch, triton and nvcc are used as found);
#   3. run tests/test_device_kernels.py: every CUDA and Triton kernel on CUDA tensors against the
#      float64 reference (the rest of the suite makes CPU tensors: CI runs it);
#   4. run the benchmark table on CUDA tensors twice: XLSPARSE_BACKEND=cuda, then =triton, each row
#      against its plain-PyTorch baseline on the same GPU.
# Usage (from anywhere): bash benchmarks/gpu.sh
# Logs (the tables are in bench-*.log), PNGs and the JSON rows (results-<backend>.tar.gz) go to
# $XLSPARSE_GPU_OUT, else $OUT, else benchmarks/results/gpu: at most eight files.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TOTAL_SECONDS=${XLSPARSE_GPU_SECONDS:-590}
OUT_DIR=${XLSPARSE_GPU_OUT:-${OUT:-benchmarks/results/gpu}}
FAILED=()

die() { echo "gpu.sh: $*" >&2; exit 2; }

# Seconds left of the total, at most $1: each stage gets its share and never the next stage's.
budget() {
  local left=$((TOTAL_SECONDS - SECONDS))
  [ "$left" -gt 10 ] || die "out of time (${TOTAL_SECONDS} s) before the next stage"
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# run_stage NAME SECONDS COMMAND...: runs it under a timeout, logs it, records a failure and goes on.
run_stage() {
  local name=$1 limit
  limit=$(budget "$2")
  shift 2
  echo "::: $name (at most $limit s)"
  local start=$SECONDS rc=0
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log" || rc=$?
  echo "::: $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

# 1. A GPU, or stop now.
command -v nvidia-smi >/dev/null 2>&1 || die "no NVIDIA GPU here (nvidia-smi not found); this script needs one"
nvidia-smi -L 2>/dev/null | grep -q "^GPU " || die "nvidia-smi lists no GPU; this script needs one"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || die "$PYTHON's torch sees no CUDA device (torch built without CUDA, or a driver mismatch)"
mkdir -p "$OUT_DIR"
nvidia-smi -L
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # Triton runs on the GPU here, not in the interpreter

# 2. The extension with CUDA kernels, built in place only when missing.
has_cuda_kernels() {
  "$PYTHON" - <<'PY' 2>/dev/null
import sys
from xlsparse import _ext
from xlsparse.ops import registry
sys.exit(0 if _ext.loaded() and registry.ops("cuda") and all(_ext.has_kernel(op, "CUDA") for op in registry.ops("cuda")) else 1)
PY
}
if has_cuda_kernels; then
  echo "::: build: xlsparse._C already has every CUDA kernel; not rebuilt"
else
  arch=$("$PYTHON" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
  rm -f xlsparse/_C*.so
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)}
  run_stage build 240 "$PYTHON" setup.py build_ext --inplace
  has_cuda_kernels || die "the build gave no CUDA kernels: see $OUT_DIR/build.log"
fi

# 3. Every kernel on CUDA tensors against float64.
run_stage tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider -rf tests/test_device_kernels.py

# 4. The benchmark table per GPU backend, each row against its baseline. Triton gets longer: it
# compiles each kernel variant on first use. Stage limits: 240 + 150 + 80 + 120 = 590 s.
for backend in cuda triton; do
  limit=80
  [ "$backend" = triton ] && limit=120
  XLSPARSE_BACKEND=$backend run_stage "bench-$backend" "$limit" "$PYTHON" -m xlsparse.cli bench --quick --device cuda \
    --out "benchmarks/results/gpu-$backend" --plot "$OUT_DIR/bench-$backend.png"
  if [ -d "benchmarks/results/gpu-$backend" ]; then
    tar czf "$OUT_DIR/results-$backend.tar.gz" "benchmarks/results/gpu-$backend"
  fi
done

echo "::: done in $SECONDS s; logs, tables and plots in $OUT_DIR"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu.sh: failed stages: ${FAILED[*]}" >&2
  exit 1
fi
