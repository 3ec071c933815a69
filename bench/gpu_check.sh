#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: print the GPU, run the CUDA-marked tests, time each
# kernel beside cuBLAS at the target shapes (the configs fa_triton picks), measure the layer's
# memory against the reference, run the benchmarks and end with the fa_triton-vs-reference table.
#
#   bash bench/gpu_check.sh            # from anywhere; PYTHON=... to pick the interpreter
#
# Stays under 6 minutes on an H100: the tests get at most GPU_CHECK_TEST_SECONDS (120), the
# per-kernel times GPU_CHECK_KERNEL_SECONDS (150), the benchmarks what is left of the
# GPU_CHECK_SECONDS (340) total; the table is then printed from the CSV rows written so far.
# Results: bench/results/<gpu>.csv (appended), bench/results/<gpu>_<family>.png and
# bench/results/sweep-<gpu>.csv (per kernel, beside cuBLAS); commit them.
# Every candidate config (the tuner's table): python -m bench.sweep, a separate call of <= 8 minutes.
# The tests run with FA_TRITON_AUTOTUNE=0 (heuristic configs, few compiles); the tuned path and
# every autotune candidate are covered by their own cuda tests, and the benchmarks autotune.
# Dry run of this script without a GPU (bench/test_gpu_check.py does this in CI):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_OUTPUT=/tmp/dry.csv GPU_CHECK_BENCH_ARGS="--preset smoke" bash bench/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
TOTAL=${GPU_CHECK_SECONDS:-340}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-120}
KERNEL_SECONDS=${GPU_CHECK_KERNEL_SECONDS:-150}
DRY=()
if [ "$DEVICE" = "cpu" ]; then
    DRY=(--dry-run)
fi
start=$SECONDS
status=0
section() { printf '\n=== %s (t=%ds)\n' "$1" $((SECONDS - start)); }

section "GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader || true
fi
if ! GPU_CHECK_DEVICE="$DEVICE" "$PYTHON" - <<'EOF'; then
import os
import sys

import torch

if os.environ["GPU_CHECK_DEVICE"] == "cpu":
    print(f"dry run on the CPU | python {sys.version.split()[0]} | torch {torch.__version__}")
    sys.exit(0)
if not torch.cuda.is_available():
    print("torch sees no CUDA device: nothing to check here (the CPU suite is python3 -m pytest -rs)")
    sys.exit(1)
props = torch.cuda.get_device_properties(0)
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"{props.name}: compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
      f"{props.total_memory / 2**30:.0f} GiB | python {sys.version.split()[0]} | torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}) | triton {triton_version}")
EOF
    exit 1
fi

if ! "$PYTHON" -c "import fa_triton.kernels" >/dev/null 2>&1; then
    section "install fa_triton (editable, no dependencies, no network)"
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi

section "CUDA tests (python3 -m pytest -rs -m cuda tests/ bench/)"
# SIGINT first: pytest then still prints its summary of what ran.
# Compiling the kernels' specializations dominates a first run (1-2 s each, CPU-bound): with
# pytest-xdist present, several workers compile in parallel on the machine's cores.
XDIST=()
if "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
    XDIST=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
fi
FA_TRITON_AUTOTUNE=0 timeout -s INT -k 15 "$TEST_SECONDS" \
    "$PYTHON" -m pytest -rs -q -m cuda -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests/ bench/
test_status=$?
if [ "$test_status" -ne 0 ]; then
    status=1
fi

section "per-kernel GPU time beside cuBLAS (python -m bench.sweep --mode chosen)"
sweep_csv=${GPU_CHECK_SWEEP_OUTPUT:-$("$PYTHON" -c "
import torch
name = torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else 'CPU (interpreter)'
print('bench/results/sweep-' + name.lower().replace(' ', '-') + '.csv')")}
timeout -s INT -k 15 $((KERNEL_SECONDS + 30)) \
    "$PYTHON" -m bench.sweep --mode chosen --time-budget "$KERNEL_SECONDS" ${DRY[@]+"${DRY[@]}"} \
    --output "$sweep_csv"
kernel_status=$?
if [ "$kernel_status" -ne 0 ]; then
    status=1
fi

section "memory of forward + backward (python -m bench.memory)"
timeout -s INT -k 15 60 "$PYTHON" -m bench.memory ${DRY[@]+"${DRY[@]}"}
memory_status=$?
if [ "$memory_status" -ne 0 ]; then
    status=1
fi

section "benchmarks (python -m bench.run --preset gpu-check)"
csv=${GPU_CHECK_OUTPUT:-$("$PYTHON" -c "from bench.results import default_csv_path; print(default_csv_path('$DEVICE'))")}
since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
left=$((TOTAL - (SECONDS - start)))
budget=$((left - 75))
if [ "$budget" -lt 20 ]; then
    budget=20
fi
timeout -s INT -k 15 $((left - 20 > 30 ? left - 20 : 30)) \
    "$PYTHON" -m bench.run --preset gpu-check --device "$DEVICE" --time-budget "$budget" --plot --no-summary \
    --output "$csv" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
bench_status=$?
if [ "$bench_status" -ne 0 ]; then
    status=1
fi

section "summary"
echo "tests: exit ${test_status}$([ "$test_status" -eq 124 ] && echo ' (timed out)') | kernels: exit ${kernel_status} | memory: exit ${memory_status} | benchmarks: exit ${bench_status}$([ "$bench_status" -eq 124 ] && echo ' (stopped at the time limit)') | total $((SECONDS - start)) s"
echo "results: ${csv} (+ PNGs next to it)"
echo
"$PYTHON" -m bench.report "$csv" --since "$since" --sweep "$sweep_csv"
exit "$status"
