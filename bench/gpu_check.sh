#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (H100/H200: about 8 minutes), in this order:
#   (a) the CUDA tests (python3 -m pytest -m cuda tests/ bench/), time-boxed;
#   (b) each kernel at 8192^3 and 4096^3 in bf16 (then fp16, tf32 and the tutorial's layers in fp32,
#       as time allows) beside the cuBLAS GEMM and the tutorial GEMM of the same shape and layout,
#       in the same run (python -m bench.sweep --mode chosen --preset gpu-check);
#   (c) the layer's forward + backward, backend="auto" and Triton-only, against the reference at
#       8192^3 and 4096^3 in bf16, fp16 and tf32, and the tutorial's layers (784->128 relu,
#       128->64 relu, 64->10 identity) at batch 8192 and 64, then more as time allows
#       (python -m bench.run --preset gpu-check);
#   (d) peak memory of forward + backward against the reference (python -m bench.memory, heuristic configs);
#   (e) torch.compile(fullgraph=True) of the tutorial MLP against eager (python -m bench.compile_overhead);
#   (f) the network (issue "the network as the unit"): 8 seeds of the tutorial MLP in one vmapped
#       pass against one by one (python -m bench.ensemble --device cuda), then, when MNIST is in
#       GPU_CHECK_DATA_DIR (default .gpu_data: torchvision's MNIST/raw/ there, git-ignored, to be
#       named in the device tool's carry), seconds per epoch of the FA MLP and nn.Linear, eager,
#       graphed and on the fused MLP, and fa_triton.mnist.train's 10 epochs
#       (python -m bench.mnist_epoch_time --device cuda --tf32 --train-epochs 10);
# then every tuning choice made (fa_triton.kernels.autotune.tuning_report(), from the cache below)
# and the report: the issue's targets (PASS / FAIL / unmeasured), each kernel, the layer table.
#
#   bash bench/gpu_check.sh            # from anywhere; PYTHON=... to pick the interpreter
#
# Outputs, all under GPU_CHECK_RESULTS (default bench/results), named by the GPU (<gpu> below,
# e.g. nvidia-h200), for committing: <gpu>.csv (layer rows, appended) and its PNGs,
# sweep-<gpu>.csv (per kernel, appended), memory-<gpu>.txt, compile-<gpu>.txt, tuning-<gpu>/ (FA_TRITON_CACHE_DIR:
# the tuner's and "auto"'s choices with their timings, JSON), tuning-<gpu>.txt (their report),
# gpu_check-<gpu>.log (everything printed). The step-(b) sweep tunes the configs the layer
# benchmarks then find in that cache.
#
# Time boxes (seconds): the tests GPU_CHECK_TEST_SECONDS (100), the per-kernel sweep
# GPU_CHECK_KERNEL_SECONDS (95, compiling included), memory GPU_CHECK_MEMORY_SECONDS (25), the
# layer benchmarks what is left of GPU_CHECK_SECONDS (345) for (a)-(e) in all; then the network
# GPU_CHECK_NETWORK_SECONDS (120).
# The tests run with FA_TRITON_AUTOTUNE=0 (heuristic configs, few compiles); the tuned path and
# every autotune candidate are covered by their own cuda tests, and the benchmarks autotune.
# Every candidate config (the tuner's table): python -m bench.sweep, a separate call of <= 8 minutes.
# Dry run of this script without a GPU (bench/test_gpu_check.py does this in CI):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_RESULTS=/tmp/dry GPU_CHECK_BENCH_ARGS="--preset smoke" bash bench/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
RESULTS=${GPU_CHECK_RESULTS:-bench/results}
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
read -r -a SWEEP_ARGS <<< "${GPU_CHECK_SWEEP_ARGS:-}"
read -r -a TEST_PATHS <<< "${GPU_CHECK_TEST_PATHS:-tests/ bench/}"
TOTAL=${GPU_CHECK_SECONDS:-345}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-100}
KERNEL_SECONDS=${GPU_CHECK_KERNEL_SECONDS:-95}
MEMORY_SECONDS=${GPU_CHECK_MEMORY_SECONDS:-25}
COMPILE_SECONDS=${GPU_CHECK_COMPILE_SECONDS:-40}
NETWORK_SECONDS=${GPU_CHECK_NETWORK_SECONDS:-120}
DATA_DIR=${GPU_CHECK_DATA_DIR:-.gpu_data}
ENSEMBLE_ARGS=()
EPOCH_ARGS=(--tf32 --train-epochs 10 --rounds 2)
COMPILE_ARGS=()
DRY=()
SWEEP_MODE=(--preset gpu-check --same-tile bf16,fp16)
if [ "$DEVICE" = "cpu" ]; then
    DRY=(--dry-run)
    SWEEP_MODE=(--same-tile --workers 0)  # the interpreter compiles nothing ahead
    COMPILE_ARGS=(--steps 3 --repeats 2)
    ENSEMBLE_ARGS=(--quick)
    EPOCH_ARGS=(--rounds 1 --chunk 200)
fi
start=$SECONDS
since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
status=0
section() { printf '\n=== %s (t=%ds)\n' "$1" $((SECONDS - start)); }
timed_out() { [ "$1" -eq 124 ] && echo " (stopped at its time limit)"; }

mkdir -p "$RESULTS" || exit 1
# The GPU (or the dry run's CPU), and the name every output is given: the last line printed.
info=$(GPU_CHECK_DEVICE="$DEVICE" "$PYTHON" - <<'EOF'
import os
import sys

from bench.results import cpu_name, device_name, slug

device = os.environ["GPU_CHECK_DEVICE"]
if device == "cpu":  # (without importing torch: CI runs this dry run)
    print(f"dry run on the CPU ({cpu_name()}) | python {sys.version.split()[0]}")
    print(slug(f"CPU: {cpu_name()}"))
    sys.exit(0)

import torch  # noqa: E402

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
print(slug(device_name("cuda")))
EOF
)
info_status=$?
gpu=$(printf '%s\n' "$info" | tail -n 1)
log="$RESULTS/gpu_check-$gpu.log"
if [ "$info_status" -eq 0 ]; then
    exec > >(tee -a "$log") 2>&1
fi
section "GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader || true
fi
printf '%s\n' "$info" | sed '$d'
if [ "$info_status" -ne 0 ]; then
    printf '%s\n' "$info" | tail -n 1
    exit 1
fi
csv=${GPU_CHECK_OUTPUT:-$RESULTS/$gpu.csv}
sweep_csv=${GPU_CHECK_SWEEP_OUTPUT:-$RESULTS/sweep-$gpu.csv}
memory_txt="$RESULTS/memory-$gpu.txt"
compile_txt="$RESULTS/compile-$gpu.txt"
choices_txt="$RESULTS/tuning-$gpu.txt"
export FA_TRITON_CACHE_DIR=${GPU_CHECK_CACHE_DIR:-$RESULTS/tuning-$gpu}
echo "outputs: $RESULTS (<name> = $gpu); tuning cache FA_TRITON_CACHE_DIR=$FA_TRITON_CACHE_DIR; log $log"

if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fa_triton') is None)"; then
    section "install fa_triton (editable, no dependencies, no network)"
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi

section "(a) CUDA tests (python3 -m pytest -rs -m cuda ${TEST_PATHS[*]}; at most ${TEST_SECONDS} s)"
# SIGINT first: pytest then still prints its summary of what ran.
# Compiling the kernels' specializations dominates a first run (1-2 s each, CPU-bound): with
# pytest-xdist present, several workers compile in parallel on the machine's cores.
XDIST=()
if [ "$DEVICE" != "cpu" ] && "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
    XDIST=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
fi
FA_TRITON_AUTOTUNE=0 timeout -s INT -k 15 "$TEST_SECONDS" \
    "$PYTHON" -m pytest -rs -q -m cuda -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} "${TEST_PATHS[@]}"
test_status=$?
if [ "$test_status" -ne 0 ]; then
    status=1
fi

section "(b) each kernel beside cuBLAS and the tutorial GEMM (python -m bench.sweep --mode chosen; at most ${KERNEL_SECONDS} s)"
timeout -s INT -k 15 $((KERNEL_SECONDS + 30)) \
    "$PYTHON" -m bench.sweep --mode chosen "${SWEEP_MODE[@]}" --time-budget "$KERNEL_SECONDS" \
    ${DRY[@]+"${DRY[@]}"} --output "$sweep_csv" ${SWEEP_ARGS[@]+"${SWEEP_ARGS[@]}"}
kernel_status=$?
if [ "$kernel_status" -ne 0 ]; then
    status=1
fi

left=$((TOTAL - (SECONDS - start)))
budget=$((left - MEMORY_SECONDS - COMPILE_SECONDS - 45))
if [ "$budget" -lt 20 ]; then
    budget=20
fi
section "(c) the layer: auto and Triton-only vs the reference (python -m bench.run --preset gpu-check; ${budget} s)"
timeout -s INT -k 15 $((budget + 25)) \
    "$PYTHON" -m bench.run --preset gpu-check --device "$DEVICE" --time-budget "$budget" --plot --no-summary \
    --output "$csv" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
bench_status=$?
if [ "$bench_status" -ne 0 ]; then
    status=1
fi

section "(d) memory of forward + backward (python -m bench.memory; at most ${MEMORY_SECONDS} s)"
# Heuristic configs (compiled in (b)): tuning an untimed shape here (gelu's) could take a minute, and the
# tile does not change memory (split partials, the one difference, are a few hundred KiB here).
FA_TRITON_AUTOTUNE=0 timeout -s INT -k 10 $((MEMORY_SECONDS + 30)) \
    "$PYTHON" -m bench.memory --time-budget "$MEMORY_SECONDS" ${DRY[@]+"${DRY[@]}"} | tee "$memory_txt"
memory_status=$?
if [ "$memory_status" -ne 0 ]; then
    status=1
fi

section "(e) torch.compile(fullgraph=True) against eager, the tutorial MLP (python -m bench.compile_overhead; at most ${COMPILE_SECONDS} s)"
timeout -s INT -k 10 "$COMPILE_SECONDS" \
    "$PYTHON" -m bench.compile_overhead --device "$DEVICE" ${COMPILE_ARGS[@]+"${COMPILE_ARGS[@]}"} | tee "$compile_txt"
compile_status=$?
if [ "$compile_status" -ne 0 ]; then
    status=1
fi

network_txt="$RESULTS/network-$gpu.txt"
section "(f) the network: 8 seeds in one pass (python -m bench.ensemble), MNIST epochs (python -m bench.mnist_epoch_time; at most ${NETWORK_SECONDS} s)"
network_start=$SECONDS
timeout -s INT -k 10 "$NETWORK_SECONDS" \
    "$PYTHON" -m bench.ensemble --device "$DEVICE" ${ENSEMBLE_ARGS[@]+"${ENSEMBLE_ARGS[@]}"} | tee "$network_txt"
network_status=$?
if [ -d "$DATA_DIR/MNIST/raw" ]; then
    network_left=$((NETWORK_SECONDS - (SECONDS - network_start)))
    if [ "$network_left" -lt 10 ]; then
        network_left=10
    fi
    timeout -s INT -k 10 "$network_left" \
        "$PYTHON" -m bench.mnist_epoch_time --device "$DEVICE" --data-dir "$DATA_DIR" "${EPOCH_ARGS[@]}" \
        | tee -a "$network_txt"
    epoch_status=$?
    if [ "$epoch_status" -ne 0 ]; then
        network_status=$epoch_status
    fi
else
    echo "no MNIST under $DATA_DIR/MNIST/raw: the epoch times are skipped (copy torchvision's MNIST/raw there)" \
        | tee -a "$network_txt"
fi
if [ "$network_status" -ne 0 ]; then
    status=1
fi

section "tuning choices (fa_triton.kernels.autotune.tuning_report(); the whole report: $choices_txt)"
"$PYTHON" -m bench.choices --cache-dir "$FA_TRITON_CACHE_DIR" --output "$choices_txt" --brief

section "summary"
echo "tests: exit ${test_status}$(timed_out "$test_status") | kernels: exit ${kernel_status}$(timed_out "$kernel_status") | layer: exit ${bench_status}$(timed_out "$bench_status") | memory: exit ${memory_status} | compile: exit ${compile_status}$(timed_out "$compile_status") | network: exit ${network_status}$(timed_out "$network_status") | total $((SECONDS - start)) s"
echo "results: $csv (+ PNGs next to it), $sweep_csv, $memory_txt, $compile_txt, $network_txt, $choices_txt, $FA_TRITON_CACHE_DIR/, $log"
echo
"$PYTHON" -m bench.report "$csv" --since "$since" --sweep "$sweep_csv"
exit "$status"
