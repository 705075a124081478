#!/usr/bin/env bash
# The whole GPU check in one go, for the first machine with an NVIDIA GPU (10 minutes at most):
#   1. stop at once, with a message, when there is no GPU;
#   2. build xlsparse._C in place with its CUDA kernels, unless the tree already has them
#      (nothing is pip-installed: the machine's python3, torch, triton and nvcc are used as found);
#   3. run tests/test_device_kernels.py: every CUDA and Triton kernel on CUDA tensors against the
#      float64 reference (the rest of the suite makes CPU tensors: CI runs it);
#   4. profile the slow kinds of row (benchmarks/profile_rows.py: host syncs, launches, kernel time);
#   5. run the benchmark tables at full size on CUDA tensors, one stage per family (a stage cut
#      short loses its own table only): XLSPARSE_BACKEND=cuda, then =triton, each row against its
#      plain-PyTorch baseline on the same GPU. XLSPARSE_GPU_QUICK=1 runs the --quick sizes.
# Usage (from anywhere): bash benchmarks/gpu.sh
# Logs (the tables are in bench-*.log) go to $XLSPARSE_GPU_OUT, else $OUT, else
# benchmarks/results/gpu; the profile, plots and JSON rows, packed at the end, to
# rows-and-plots.tar.gz there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TOTAL_SECONDS=${XLSPARSE_GPU_SECONDS:-590}
OUT_DIR=${XLSPARSE_GPU_OUT:-${OUT:-benchmarks/results/gpu}}
FAILED=()

die() { echo "gpu.sh: $*" >&2; exit 2; }

# Seconds left of the total, at most $1, keeping 10 s to pack the results: each stage gets its
# share and never the next stage's.
budget() {
  local left=$((TOTAL_SECONDS - SECONDS - 10))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# run_stage NAME SECONDS COMMAND...: runs it under a timeout, logs it, records a failure and goes on.
run_stage() {
  local name=$1 limit
  limit=$(budget "$2")
  shift 2
  if [ "$limit" -lt 15 ]; then
    echo "::: $name: skipped, out of time (${TOTAL_SECONDS} s)"
    FAILED+=("$name (skipped: out of time)")
    return
  fi
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

# The benchmarks ship as xlsparse.benchmarks (setup.py maps the folder); in a tree that is not
# installed a link for the run stands in for that mapping.
if ! "$PYTHON" -c "import xlsparse.benchmarks" 2>/dev/null; then
  ln -s ../benchmarks xlsparse/benchmarks
  trap 'rm -f xlsparse/benchmarks' EXIT
fi

# 3. Every kernel on CUDA tensors against float64.
# pytest-xdist, where present, spreads the float64 CPU references over the cores. -v names each
# result as it comes, so a stage cut at its limit still says which cases failed (on an H200 with
# 8 workers: about 90% of the cases in 170 s).
parallel=()
"$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 8)
run_stage tests 240 "$PYTHON" -m pytest -v -p no:cacheprovider -rf --tb=line ${parallel[@]+"${parallel[@]}"} tests/test_device_kernels.py

# 4. Where the slow rows' time goes: host syncs, launches and kernel time per call. Its log goes
# into the packed folder: a device lease returns at most eight files.
EXTRA="$OUT_DIR/rows-and-plots"
mkdir -p "$EXTRA"
run_stage rows-and-plots/profile 60 "$PYTHON" -m xlsparse.benchmarks.profile_rows --device cuda

# 5. The benchmark tables, per GPU backend and family, each row against its baseline. Triton gets
# longer: it compiles each kernel variant on first use.
quick=()
[ "${XLSPARSE_GPU_QUICK:-0}" = 1 ] && quick=(--quick)
for backend in cuda triton; do
  for family in matmul optim compose; do
    limit=$([ "$family" = matmul ] && echo 110 || echo 55)
    [ "$backend" = triton ] && limit=$((limit + 20))
    XLSPARSE_BACKEND=$backend run_stage "bench-$backend-$family" "$limit" "$PYTHON" -m xlsparse.cli bench \
      ${quick[@]+"${quick[@]}"} --device cuda --family "$family" --out "$EXTRA/$backend" --plot "$EXTRA/$backend-$family.png"
  done
done
tar czf "$OUT_DIR/rows-and-plots.tar.gz" -C "$OUT_DIR" rows-and-plots && rm -rf "$EXTRA"

echo "::: done in $SECONDS s; logs, tables and plots in $OUT_DIR"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu.sh: failed stages: ${FAILED[*]}" >&2
  exit 1
fi
