#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: print the GPU, run the CUDA-marked tests, run the
# benchmarks (targets first) and end with the short fa_triton-vs-reference table.
#
#   bash bench/gpu_check.sh            # from anywhere; PYTHON=... to pick the interpreter
#
# Stays under 6 minutes on an H100: the tests get at most GPU_CHECK_TEST_SECONDS (150), the
# benchmarks stop starting new measurements when the GPU_CHECK_SECONDS (330) total is near and
# are interrupted before it; the table is then printed from the CSV rows written so far.
# Results: bench/results/<gpu>.csv (appended) and bench/results/<gpu>_<family>.png; commit them.
# The tests run with FA_TRITON_AUTOTUNE=0 (heuristic configs, few compiles); the tuned path and
# every autotune candidate are covered by their own cuda tests, and the benchmarks autotune.
# Dry run of this script without a GPU (bench/test_gpu_check.py does this in CI):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_OUTPUT=/tmp/dry.csv GPU_CHECK_BENCH_ARGS="--preset smoke" bash bench/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
TOTAL=${GPU_CHECK_SECONDS:-330}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-150}
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
echo "tests: exit ${test_status}$([ "$test_status" -eq 124 ] && echo ' (timed out)') | benchmarks: exit ${bench_status}$([ "$bench_status" -eq 124 ] && echo ' (stopped at the time limit)') | total $((SECONDS - start)) s"
echo "results: ${csv} (+ PNGs next to it)"
echo
"$PYTHON" -m bench.report "$csv" --since "$since"
exit "$status"
