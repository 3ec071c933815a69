"""One-call GPU sweep: each kernel of the FA layer at the target shapes, beside cuBLAS and the tutorial GEMM.

    python -m bench.sweep                              # every candidate config (a GPU, <= 8 minutes cold)
    python -m bench.sweep --mode chosen                # only the configs fa_triton picks
    python -m bench.sweep --mode chosen --preset gpu-check --same-tile   # what bench/gpu_check.sh runs
    python -m bench.sweep --emit-table bench/results/sweep-<gpu>.csv   # -> kernels/tuned_tables.py
    python -m bench.sweep --dry-run                    # CPU: interpreter, tiny shapes (CI)

Targets (``--preset full``, in priority order): square layers M = N = K = 8192 and 4096 in bf16
and fp16; the tutorial's layers 784→128, 128→64 (relu) and 64→10 (identity) at batch 8192 and 64
in fp32 (IEEE), bf16 and tf32; the squares in tf32 and fp32 (IEEE). ``--preset gpu-check``: the
squares in bf16, fp16 and tf32 and the tutorial's layers in fp32 (what gpu_check.sh's layer
benchmarks then run, so that they find their configs tuned).

Jobs per target: the four launches of the layer's step, as its autograd runs them::

    job              fa_triton launch                                      layout  baseline
    forward          y = f(x Wᵀ + b) (+ f's extra)     fa_linear_forward        NT      cuBLAS torch.mm(x, W.t())
    local_error      δ = g ⊙ f'(z), grad_b = Σ δ       fa_linear_local_error    pass    torch: g * f'(saved), δ.sum(0)
    backward_input   grad_x = δ B                      fa_linear_backward_input NN      cuBLAS torch.mm(δ, B)
    backward_weight  grad_W = δᵀ x                     fa_linear_backward_weight TN     cuBLAS torch.mm(δ.t(), x)

(with f = identity δ is g: the δ pass only sums grad_b). Each GEMM job is also timed beside
``tutorial_matmul`` (``kernels/tutorial_gemm.py``, Triton's tutorial-03 GEMM) of the same layout,
with the tile 128x256x64 w8 s3 (NN, TN) or 256x128x64 w8 s3 (NT) in 16 bits, 128x128x32 w8 s3
in fp32, each side clamped to the problem; with ``--same-tile`` (chosen mode) also with the
tile of the config fa_triton chose. ``x_baseline`` and ``x_tutorial`` are speed ratios:
baseline (or tutorial) time / fa_triton time, above 1 when fa_triton is faster. The δ pass is
a memory pass: its row also gives GB/s (g, saved and δ moved once, grad_b written once).

Each job runs with every candidate config in ``--mode sweep`` (the GEMMs:
``tuning.candidate_configs``; the δ pass: a few tiles and splits around ``tuning.pass_config``),
or with the config fa_triton picks by itself in ``--mode chosen`` (tuned by
``kernels.autotune``, remembered in ``$FA_TRITON_CACHE_DIR``). GPU time: ``do_bench`` (L2
flushed) for large problems, replay of a CUDA graph for launch-bound ones, the same timer for
every provider of a row. Every result is checked against PyTorch's (``err``: max |diff| / max |torch|).

Cold caches: before timing, every config (and the tutorial's tiles) is compiled in parallel
worker processes (Triton's ``run(..., warmup=True)`` fills its on-disk cache), then the rows are
timed one by one in priority order until ``--time-budget`` seconds have passed; rows are appended
to the CSV as they come.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

COLUMNS = ("gpu", "torch", "triton", "commit", "timestamp", "target", "job", "kernel", "layout", "dtype",
           "precision", "activation", "M", "K", "N", "config", "block_rows", "block_cols", "block_red", "num_warps",
           "num_stages", "group", "split", "tma", "chosen", "ms", "tflops", "gbps", "baseline", "baseline_ms",
           "x_baseline", "tutorial_config", "tutorial_ms", "x_tutorial", "tutorial_same_ms", "x_tutorial_same", "err",
           "status", "key")
# Launch-bound below this many multiply-adds (GEMMs) or elements (the δ pass): timed by CUDA-graph replay.
SMALL_MACS = 1 << 26
SMALL_ELEMENTS = 1 << 20
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "tf32": 5e-3, "fp32": 1e-4}
TUTORIAL_LAYERS = ((784, 128, "relu"), (128, 64, "relu"), (64, 10, "identity"))
NEGATIVE_SLOPE = 0.01
JOBS = ("forward", "local_error", "backward_input", "backward_weight")
GEMM_JOBS = ("forward", "backward_input", "backward_weight")
# The tuner's kernel of each GEMM job, and the GEMM's layout (a @ b: N = row-major, T = transposed).
KERNEL_OF_JOB = {"forward": "forward", "local_error": "local_error", "backward_input": "backward_input",
                 "backward_weight": "backward_weight"}
LAYOUT = {"forward": "NT", "local_error": "pass", "backward_input": "NN", "backward_weight": "TN"}
# The tutorial GEMM's tile per layout: (block_m, block_n, block_k, num_warps, num_stages).
TUTORIAL_TILES_HALF = {"NN": (128, 256, 64, 8, 3), "TN": (128, 256, 64, 8, 3), "NT": (256, 128, 64, 8, 3)}
TUTORIAL_TILE_FP32 = (128, 128, 32, 8, 3)


@dataclasses.dataclass(frozen=True)
class Target:
    """One layer shape in one dtype: M rows, K = in_features, N = out_features."""

    name: str
    M: int
    K: int
    N: int
    activation: str
    dtype: str  # bf16, fp16, tf32 (fp32 tensors, tf32 allowed) or fp32 (IEEE)


def _squares(dtypes, sizes=(8192, 4096)) -> list[Target]:
    return [Target("square", n, n, n, "relu", dtype) for dtype in dtypes for n in sizes]


def _tutorial(dtypes, batches=(8192, 64)) -> list[Target]:
    return [Target("tutorial", M, K, N, act, dtype) for dtype in dtypes for M in batches
            for K, N, act in TUTORIAL_LAYERS]


def targets(dry_run: bool = False, preset: str = "full") -> list[Target]:
    """In priority order (see the module docstring)."""
    if dry_run:  # the interpreter: tiny shapes, every path once
        return [Target("square", 48, 48, 48, "relu", "fp16"), Target("tutorial", 40, 24, 10, "identity", "fp32"),
                Target("tutorial", 20, 32, 16, "gelu", "tf32")]
    if preset == "gpu-check":
        return _squares(("bf16", "fp16", "tf32")) + _tutorial(("fp32",))
    return _squares(("bf16", "fp16")) + _tutorial(("fp32", "bf16", "tf32")) + _squares(("tf32", "fp32"))


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}[name]


class _Precision:
    """PyTorch's fp32 matmul switch for one target (the kernels and cuBLAS both follow it)."""

    def __init__(self, dtype: str):
        self.tf32 = dtype == "tf32"

    def __enter__(self):
        import torch

        matmul = torch.backends.cuda.matmul
        self.name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
        self.saved = getattr(matmul, self.name)
        value = ("tf32" if self.tf32 else "ieee") if self.name == "fp32_precision" else self.tf32
        setattr(matmul, self.name, value)

    def __exit__(self, *exc):
        import torch

        setattr(torch.backends.cuda.matmul, self.name, self.saved)


def _block(size: int, cap: int) -> int:
    from fa_triton.kernels import tuning

    return tuning.block(size, cap)


class Case:
    """The tensors of one target, and for each job: its fa_triton launch, its baseline (cuBLAS,
    or the unfused torch ops of the δ pass), the tutorial GEMM of the same layout, and the
    expected results."""

    def __init__(self, target: Target, device: str):
        import torch

        from fa_triton.rules.activations import activation_backward, apply_activation, extra_for_backward, saves_extra

        t = target
        dtype = _torch_dtype(t.dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        self.target, self.device = t, device
        self.x = torch.randn(t.M, t.K, device=device, generator=gen).to(dtype)
        bound = t.K**-0.5
        self.weight = ((torch.rand(t.N, t.K, device=device, generator=gen) * 2 - 1) * bound).to(dtype)
        self.feedback = ((torch.rand(t.N, t.K, device=device, generator=gen) * 2 - 1) * bound).to(dtype)
        self.bias = ((torch.rand(t.N, device=device, generator=gen) * 2 - 1) * bound).to(dtype)
        self.grad_y = torch.randn(t.M, t.N, device=device, generator=gen).to(dtype)
        self.store_extra = saves_extra(t.activation, NEGATIVE_SLOPE)
        # The layer's δ pass stores δ unless f is the identity (then δ is g and only grad_b is summed).
        self.store_delta = t.activation != "identity"
        with _Precision(t.dtype):
            z = torch.nn.functional.linear(self.x, self.weight, self.bias)
            self.y = apply_activation(z, t.activation, NEGATIVE_SLOPE)
            extra = extra_for_backward(z, t.activation) if self.store_extra else None
            self.saved = None if t.activation == "identity" else (extra if self.store_extra else self.y)
            saved32 = None if self.saved is None else self.saved.float()
            delta32 = activation_backward(self.grad_y.float(), saved32, t.activation, NEGATIVE_SLOPE)
            self.delta = delta32.to(dtype).contiguous() if self.store_delta else self.grad_y
            self.expected = {
                "forward": [self.y] + ([extra] if self.store_extra else []),
                "local_error": ([delta32] if self.store_delta else []) + [delta32.sum(0)],
                "backward_input": [self.delta @ self.feedback],
                "backward_weight": [self.delta.t() @ self.x],
            }
        # (fa_triton.reference, the attribute, is the public function: import the module's function by path)
        from fa_triton.ops.backends.reference import local_error

        self._reference_local_error = local_error
        self.out_y = torch.empty_like(self.y)
        self.out_extra = torch.empty_like(self.y) if self.store_extra else None
        self.out_delta = torch.empty_like(self.grad_y)
        self.out_grad_x = torch.empty_like(self.x)
        self.out_grad_w = torch.empty_like(self.weight)
        self.out_mm = {job: torch.empty_like(self.expected[job][0]) for job in GEMM_JOBS}
        self.out_tutorial = {job: torch.empty_like(self.expected[job][0]) for job in GEMM_JOBS}

    def jobs(self) -> list[str]:
        return list(JOBS)

    def sizes(self, job: str) -> tuple[int, int, int, str]:
        """(rows, cols, red, batch axis) of the job's kernel as kernels.tuning names them (the
        δ pass: rows × cols = M × N, no reduction)."""
        t = self.target
        return {"forward": (t.M, t.N, t.K, "rows"), "local_error": (t.M, t.N, 1, "rows"),
                "backward_input": (t.M, t.K, t.N, "rows"), "backward_weight": (t.N, t.K, t.M, "red")}[job]

    def precision(self) -> str:
        """The dot precision the kernels use for this target (fp32 IEEE unless tf32 is allowed)."""
        return "ieee" if self.target.dtype == "fp32" else "tf32"

    def activation(self, job: str) -> str:
        return self.target.activation if job in ("forward", "local_error") else "identity"

    def operands(self, job: str) -> tuple:
        """The GEMM's operands and output, as its launch plan sees them."""
        return {"forward": (self.x, self.weight, self.out_y), "backward_input": (self.delta, self.feedback,
                                                                                 self.out_grad_x),
                "backward_weight": (self.delta, self.x)}[job]

    def tma_layout(self, job: str) -> bool:
        """Whether the job's operands allow the tensor-descriptor kernels (as the launch plan decides)."""
        from fa_triton.kernels import plans

        tensors = self.operands(job)
        return not plans.needs_int64(*tensors) and plans.tma_layout(*tensors)

    def problem(self, job: str):
        """The GEMM job's tuning problem (``kernels.tuning.Problem``), as its launch plan states it."""
        from fa_triton.kernels import tuning

        rows, cols, red, batch_axis = self.sizes(job)
        forward = job == "forward"
        return tuning.Problem(KERNEL_OF_JOB[job], rows, cols, red, batch_axis, self.x.dtype, self.precision(),
                              self.target.activation if forward else "", self.store_extra if forward else False,
                              self.tma_layout(job))

    # ------------------------------------------------------------------------ the launches

    def launch(self, job: str, config):
        """A callable running the job's fa_triton launch (``config`` None: fa_triton's own pick);
        it returns the job's outputs."""
        from fa_triton import kernels

        act, slope = self.target.activation, NEGATIVE_SLOPE
        if job == "forward":
            return lambda: kernels.fa_linear_forward(self.x, self.weight, self.bias, act, slope, self.store_extra,
                                                     self.out_y, config=config)
        if job == "local_error":
            out = self.out_delta if self.store_delta else None
            return lambda: kernels.fa_linear_local_error(self.grad_y, self.saved, act, slope,
                                                         store_delta=self.store_delta, bias_grad=True, out=out,
                                                         config=config)
        if job == "backward_input":
            return lambda: kernels.fa_linear_backward_input(self.delta, None, self.feedback, "identity",
                                                            config=config, out=self.out_grad_x)
        return lambda: kernels.fa_linear_backward_weight(self.delta, None, self.x, "identity", 0.0, False,
                                                         config=config, out=(self.out_grad_w, None))

    def outputs(self, job: str, result) -> list:
        if job == "forward":
            y, extra = result
            return [y] + ([extra] if self.store_extra else [])
        if job == "local_error":
            delta, grad_b = result
            return ([delta] if self.store_delta else []) + [grad_b]
        if job == "backward_input":
            return [result]
        return [result[0]]

    def gemm_operands(self, job: str) -> tuple:
        """(a, b) with a @ b the job's GEMM in its own layout."""
        return {"forward": (self.x, self.weight.t()), "backward_input": (self.delta, self.feedback),
                "backward_weight": (self.delta.t(), self.x)}[job]

    def baseline(self, job: str) -> tuple[str, object]:
        """(name, callable) of what PyTorch runs for the job: cuBLAS for a GEMM, the unfused ops
        of the δ pass (``fa_triton.ops.backends.reference.local_error``: g * f'(saved), then δ.sum(0))."""
        import torch

        if job == "local_error":
            act, saved, grad_y, need = self.target.activation, self.saved, self.grad_y, self.store_delta
            local_error = self._reference_local_error
            return "torch_unfused", lambda: local_error(grad_y, saved, act, NEGATIVE_SLOPE, need, True)
        a, b = self.gemm_operands(job)
        out = self.out_mm[job]
        return "cublas" if self.x.is_cuda else "torch.mm", lambda: torch.mm(a, b, out=out)

    def tutorial_tile(self, job: str) -> tuple[int, int, int, int, int]:
        """The tutorial GEMM's default tile for this job's layout and dtype, clamped to the problem."""
        rows, cols, red, _ = self.sizes(job)
        bm, bn, bk, warps, stages = (TUTORIAL_TILE_FP32 if self.target.dtype in ("fp32", "tf32")
                                     else TUTORIAL_TILES_HALF[LAYOUT[job]])
        return _block(rows, bm), _block(cols, bn), _block(red, bk), warps, stages

    def tutorial(self, job: str, tile: tuple):
        """A callable running tutorial_matmul on the job's GEMM with ``tile`` (bm, bn, bk, warps, stages[, group])."""
        from fa_triton.kernels.tutorial_gemm import tutorial_matmul

        a, b = self.gemm_operands(job)
        out = self.out_tutorial[job]
        bm, bn, bk, warps, stages, *group = tile
        kwargs = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                      group_m=group[0] if group else 8, input_precision=self.precision())
        return lambda: tutorial_matmul(a, b, out, **kwargs)

    def flops(self, job: str) -> float:
        t = self.target
        return 0.0 if job == "local_error" else 2.0 * t.M * t.N * t.K

    def bytes_moved(self, job: str) -> float:
        """The least traffic of the job: operands read once, results written once."""
        t, size = self.target, self.x.element_size()
        if job == "local_error":
            return float((t.M * t.N * (1 + (self.saved is not None) + self.store_delta) + t.N) * size)
        rows, cols, red, _ = self.sizes(job)
        return float((rows * red + red * cols + rows * cols) * size)

    def small(self, job: str) -> bool:
        t = self.target
        return t.M * t.N < SMALL_ELEMENTS if job == "local_error" else t.M * t.N * t.K < SMALL_MACS


def _interpreted(device: str) -> bool:
    return device == "cpu"


def candidates(case: Case, job: str, device: str) -> list:
    """The configs timed for a job in sweep mode (the first one is what the tuner starts from)."""
    import torch

    from fa_triton.kernels import tuning

    rows, cols, red, _ = case.sizes(job)
    dtype = case.x.dtype
    dev = torch.device(device)
    sms = tuning.sm_count(dev)
    if job == "local_error":
        base = tuning.pass_config(rows, cols, sms, _interpreted(device))
        if _interpreted(device):
            return [base, tuning.LaunchConfig(16, 16, 16, split=2)]
        configs = [base]
        for block_rows, block_cols in ((base.block_rows, base.block_cols), (64, base.block_cols),
                                       (16, base.block_cols), (base.block_rows, _block(cols, 64))):
            for split in (base.split, max(1, base.split // 2), base.split * 2):
                config = base.replace(block_rows=block_rows, block_cols=block_cols, split=split)
                if config not in configs:
                    configs.append(config)
        return configs[:8]
    kernel = KERNEL_OF_JOB[job]
    if _interpreted(device):  # dry run: the interpreter's heuristic, one small tile, its TMA variant
        heuristic = tuning.heuristic_config(kernel, rows, cols, red, dtype, 1, True)
        small = tuning.LaunchConfig(16, 16, 16, split=2 if kernel != "backward_input" else 1)
        return [heuristic, small] + ([small.replace(split=1, tma=True)] if case.tma_layout(job) else [])
    tma = tuning.tma_allowed(dev, case.problem(job))
    return tuning.candidate_configs(kernel, rows, cols, red, dtype, sms, tma)


def _tile(config) -> tuple:
    return (config.block_rows, config.block_cols, config.block_red, config.num_warps, config.num_stages,
            config.group)


# ------------------------------------------------------------------------------- timing

def gpu_ms(fn, small: bool, rep_ms: int) -> float:
    """Median GPU ms of one ``fn()``: a replayed CUDA graph when launch-bound, else do_bench."""
    from triton.testing import do_bench, do_bench_cudagraph

    if small:
        ms = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5])
    else:
        ms = do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5])
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def cpu_ms(fn, small: bool, rep_ms: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# ----------------------------------------------------------------------- parallel compile

_WORKER_CASES: dict = {}


def _warm_init() -> None:
    """In each compile worker: every kernel's launch compiles (warmup=True) instead of running."""
    from fa_triton.kernels import tutorial_gemm
    from fa_triton.kernels.launchers import JIT_KERNELS

    for kernel in (*JIT_KERNELS.values(), tutorial_gemm.tutorial_matmul_kernel):
        kernel.run = (lambda run: lambda *a, grid, warmup, **kw: run(*a, grid=grid, warmup=True, **kw))(kernel.run)


def _warm_task(args) -> int:
    """Compile the given (target, job, kind, config) launches (one kernel at one or more sizes):
    fills Triton's disk cache. Returns how many compiled."""
    items, device = args
    done = 0
    for target, job, kind, config in items:
        try:
            if target not in _WORKER_CASES:
                _WORKER_CASES.clear()  # one target's tensors at a time
                _WORKER_CASES[target] = Case(target, device)
            case = _WORKER_CASES[target]
            with _Precision(target.dtype):
                (case.launch(job, config) if kind == "fa" else case.tutorial(job, config))()
            done += 1
        except Exception:  # noqa: BLE001 - the timing phase records the failure
            pass
    return done


def warm_compile(items: list, device: str, workers: int, seconds: float | None = None) -> int:
    """Compile ``items`` in ``workers`` processes, in their order (the priority order), for at
    most ``seconds`` (what has not started then is left to the timing phase). Items that compile
    the same kernel (the same dtype, job, activation and config at another size) form one task,
    so the second finds the first in Triton's cache. Returns how many compiled."""
    if workers <= 0 or not items:
        return 0
    import multiprocessing
    from concurrent.futures import wait

    tasks: dict[tuple, list] = {}
    for item in items:
        target, job, kind, config = item
        tasks.setdefault((target.dtype, target.activation, job, kind, config), []).append(item)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_warm_init)
    try:
        futures = [pool.submit(_warm_task, (task, device)) for task in tasks.values()]
        wait(futures, timeout=seconds)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # waits for the tasks already running only
    return sum(f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None)


# --------------------------------------------------------------------------------- sweep

def _environment(device: str) -> dict:
    import subprocess

    import torch
    import triton

    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def default_output(device: str) -> Path:
    """bench/results/sweep-<gpu>.csv (the GPU's name as bench.results.slug writes it)."""
    from .results import RESULTS_DIR, slug

    name = "CPU (interpreter)"
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
    return RESULTS_DIR / f"sweep-{slug(name)}.csv"


def _error(outputs: list, expected: list) -> float:
    worst = 0.0
    for got, want in zip(outputs, expected, strict=True):
        scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-30)
        worst = max(worst, float((got.float() - want.float()).abs().max()) / scale if got.numel() else 0.0)
    return worst


def _chosen_config(case: Case, job: str, fn, device: str):
    """Run the job's launch with fa_triton's own choice and return that config."""
    import torch

    from fa_triton.kernels import plans, tuning

    if job == "local_error":
        rows, cols, _, _ = case.sizes(job)
        return fn(), tuning.pass_config(rows, cols, tuning.sm_count(torch.device(device)), _interpreted(device))
    plans.clear_plans()  # the first call builds (and tunes) the one plan this launch needs
    result = fn()
    return result, next(iter(plans.PLANS.values())).config


def _same_tile(args, target: Target) -> bool:
    """Whether the tutorial GEMM is also timed with the chosen config's tile for this target."""
    wanted = args.same_tile
    return bool(wanted) and (wanted == "all" or target.dtype in wanted.split(","))


def _plan(args, device: str, chosen_mode: bool) -> tuple[list, list]:
    """(what to time: [(target, job, config)], what to compile first: [(target, job, kind, config)])."""
    from fa_triton.kernels import autotune

    wanted = [t for t in targets(args.dry_run, args.preset) if not args.dtypes or t.dtype in args.dtypes.split(",")]
    plan, compile_list = [], []
    for target in wanted:
        case = Case(target, device)
        for job in case.jobs():
            configs = candidates(case, job, device)
            if job in GEMM_JOBS:
                compile_list.append((target, job, "tutorial", case.tutorial_tile(job)))
            if chosen_mode:
                plan.append((target, job, None))
                if job in GEMM_JOBS and _table_key(case, job, device) in autotune.TABLE:
                    continue
                rows, cols, red, _ = case.sizes(job)
                if job == "local_error" or not autotune.AUTOTUNE or rows * cols * red < autotune.TUNE_MIN_MACS:
                    configs = configs[:1]  # not tuned: the heuristic (the δ pass: pass_config) only
                compile_list += [(target, job, "fa", config) for config in configs]
                if _same_tile(args, target) and job in GEMM_JOBS:
                    tiles = dict.fromkeys(_tile(config) for config in configs)
                    compile_list += [(target, job, "tutorial", tile) for tile in tiles]
            else:
                plan += [(target, job, config) for config in configs]
                compile_list += [(target, job, "fa", config) for config in configs]
        del case
    return plan, compile_list


def run_sweep(args) -> Path:
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.sweep needs a CUDA GPU (or --dry-run)")
    env = _environment(device)
    output = Path(args.output) if args.output else default_output(device)
    output.parent.mkdir(parents=True, exist_ok=True)
    new_file = not output.exists() or output.stat().st_size == 0
    if not new_file:
        with output.open(newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != COLUMNS:
            raise SystemExit(f"bench.sweep: {output} has other columns (an older sweep's?): write to a new file")
    timer = cpu_ms if device == "cpu" else gpu_ms
    start = time.monotonic()
    chosen_mode = args.mode == "chosen"

    # Phase 1: what will be timed, and every config timing or tuning will launch, compiled in
    # parallel (in chosen mode the tuner's candidates, unless the sweep's table has the key).
    plan, compile_list = _plan(args, device, chosen_mode)
    compiled = 0
    try:
        compiled = warm_compile(compile_list, device, args.workers, args.compile_share * args.time_budget)
    except Exception as err:  # noqa: BLE001 - the timing below compiles what is missing, one by one
        print(f"bench.sweep: the parallel compile failed ({type(err).__name__}: {err}); compiling while timing",
              flush=True)
    print(f"bench.sweep: {len(plan)} launches to time on {env['gpu']} ({args.mode} mode); "
          f"{compiled} of {len(compile_list)} launches compiled first by {args.workers} workers in "
          f"{time.monotonic() - start:.0f} s", flush=True)

    with output.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        case, measured = None, {}
        for target, job, config in plan:
            if time.monotonic() - start > args.time_budget:
                print(f"bench.sweep: time budget of {args.time_budget:.0f} s reached; rows so far are in {output}",
                      flush=True)
                break
            if case is None or case.target != target:
                case, measured = None, {}
                try:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    case = Case(target, device)
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: the other targets go on
                    print(f"bench.sweep: {target} skipped ({type(err).__name__}: {err})", flush=True)
                    continue
            row = _time_row(case, job, config, env, timer, measured, args, device)
            writer.writerow(row)
            f.flush()
            _print_row(row)
    return output


def _time_row(case: Case, job: str, config, env: dict, timer, measured: dict, args, device: str) -> dict:
    """Time one (target, job, config) and its baselines (each baseline once per target and job)."""
    t = case.target
    small = case.small(job)
    row = dict(env, target=t.name, job=job, kernel=KERNEL_OF_JOB[job], layout=LAYOUT[job], dtype=t.dtype,
               precision=case.precision(), activation=case.activation(job), M=t.M, K=t.K, N=t.N,
               chosen=config is None)

    def timed(name, fn):
        if name not in measured:
            try:
                measured[name] = timer(fn, small, args.rep_ms)
            except Exception as err:  # noqa: BLE001 - recorded as NaN, the sweep goes on
                measured[name] = float("nan")
                print(f"bench.sweep: {name} of {t} {job} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
        return measured[name]

    with _Precision(t.dtype):
        baseline, baseline_fn = case.baseline(job)
        row.update(baseline=baseline, baseline_ms=timed((job, "baseline"), baseline_fn))
        if job in GEMM_JOBS:
            tile = case.tutorial_tile(job)
            row.update(tutorial_config=_describe_tile(tile), tutorial_ms=timed((job, "tutorial", tile),
                                                                               case.tutorial(job, tile)))
        try:
            fn = case.launch(job, config)
            if config is None:  # the config fa_triton picks: the one plan the first call builds
                result, config = _chosen_config(case, job, fn, device)
            else:
                result = fn()
            err = _error(case.outputs(job, result), case.expected[job])
            ms = timer(fn, small, args.rep_ms)
            status = "ok" if err <= TOLERANCE[t.dtype] else "wrong"
        except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
            ms, err, status = float("nan"), float("nan"), f"failed: {type(error).__name__}: {str(error)[:200]}"
        if row["chosen"] and _same_tile(args, t) and job in GEMM_JOBS and config is not None:
            tile = _tile(config)
            row["tutorial_same_ms"] = timed((job, "tutorial", tile), case.tutorial(job, tile))
    ok = ms == ms and ms > 0
    flops = case.flops(job)
    row.update(ms=ms, err=err, status=status, tflops=flops / ms / 1e9 if ok and flops else float("nan"),
               gbps=case.bytes_moved(job) / ms / 1e6 if ok else float("nan"))
    for column, base in (("x_baseline", "baseline_ms"), ("x_tutorial", "tutorial_ms"),
                         ("x_tutorial_same", "tutorial_same_ms")):
        if base in row:
            row[column] = row[base] / ms if ok else float("nan")
    if config is not None:
        row.update(config=_describe(config), **{k: v for k, v in dataclasses.asdict(config).items() if k in COLUMNS})
        if job in GEMM_JOBS:
            row["key"] = repr(_table_key(case, job, device)[1:])
    return {k: _cell(v) for k, v in row.items()}


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _print_row(row: dict) -> None:
    t = f"{row['target']:8s} {row['dtype']:4s} {row['M']:>5d}x{row['K']:<5d}->{row['N']:<5d} {row['job']:15s}"
    ms = float(row["ms"])
    parts = [f"{row.get('config', '?'):32s} {ms:8.4f} ms"]
    if row["job"] == "local_error":
        parts.append(f"{float(row['gbps']):7.0f} GB/s  torch {float(row['baseline_ms']):8.4f} ms "
                     f"x{float(row['x_baseline']):.2f}")
    else:
        parts.append(f"{row['baseline']} {float(row['baseline_ms']):8.4f} ms x{float(row['x_baseline']):.2f}  "
                     f"tutorial {float(row['tutorial_ms']):8.4f} ms x{float(row['x_tutorial']):.2f}")
        if row.get("tutorial_same_ms") not in (None, ""):
            parts.append(f"(same tile x{float(row['x_tutorial_same']):.2f})")
    status = row["status"]
    parts.append(f"err {float(row['err']):.1e}" + ("" if status == "ok" else f" {status}"))
    print(f"{t} " + "  ".join(parts), flush=True)


def _table_key(case: Case, job: str, device: str) -> tuple:
    """(GPU name,) + the tuner's problem_key of a GEMM job: what autotune.TABLE is keyed by."""
    import torch

    from fa_triton.kernels import tuning

    dev = torch.device(device)
    problem = case.problem(job)
    return (tuning.device_name(dev),) + tuning.problem_key(problem, tuning.tma_allowed(dev, problem))


def _describe(config) -> str:
    text = f"{config.block_rows}x{config.block_cols}x{config.block_red} w{config.num_warps} s{config.num_stages}"
    return text + (f" split{config.split}" if config.split > 1 else "") + (" tma" if config.tma else "")


def _describe_tile(tile: tuple) -> str:
    bm, bn, bk, warps, stages, *_ = tile
    return f"{bm}x{bn}x{bk} w{warps} s{stages}"


# ---------------------------------------------------------------------------- the table

def emit_table(csv_paths: list[str], out_path: str) -> int:
    """Write kernels/tuned_tables.py: per (GPU, key) the fastest correct GEMM config of the CSVs
    (sweep-mode rows; the δ pass has no table)."""
    import ast

    best: dict[tuple, tuple[float, dict]] = {}
    for path in csv_paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["status"] != "ok" or not row.get("key") or row["chosen"] == "True":
                    continue
                ms = float(row["ms"])
                key = (row["gpu"],) + ast.literal_eval(row["key"])
                fields = {k: int(row[k]) for k in ("block_rows", "block_cols", "block_red", "num_warps", "num_stages",
                                                   "group", "split") if k in row and row[k] != ""}
                fields["tma"] = row["tma"] == "True"
                if key not in best or ms < best[key][0]:
                    best[key] = (ms, fields)
    lines = [
        '"""Launch configs measured on real GPUs by ``bench/sweep.py`` (``--emit-table`` wrote this file).',
        "",
        "Keys: (GPU name as torch reports it,) + ``tuning.problem_key(...)`` — kernel, dtype name, dot",
        "precision, tag, store flag, TMA allowed, sizes with the batch bucketed; values: the fields of",
        "the fastest ``LaunchConfig`` measured for that key (a dict). A key found here is used without",
        "tuning; any other key is tuned at run time (see ``autotune.select_config``).",
        "",
        f"Sources: {', '.join(Path(p).name for p in csv_paths)}.",
        '"""',
        "",
        "TABLE: dict = {",
    ]
    lines += [f"    {key!r}: {fields!r},  # {ms:.4f} ms" for key, (ms, fields) in sorted(best.items())]
    lines += ["}", ""]
    Path(out_path).write_text("\n".join(lines))
    return len(best)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("sweep", "chosen"), default="sweep",
                        help="sweep: every candidate config; chosen: the config fa_triton picks")
    parser.add_argument("--preset", choices=("full", "gpu-check"), default="full", help="which targets (GPU)")
    parser.add_argument("--dtypes", default="", help="only these target dtypes (bf16,fp16,tf32,fp32)")
    parser.add_argument("--same-tile", nargs="?", const="all", default="", metavar="DTYPES",
                        help="chosen mode: also time the tutorial GEMM with the chosen config's tile (for all "
                             "targets, or those of these dtypes, e.g. bf16,fp16)")
    parser.add_argument("--time-budget", type=float, default=420, help="seconds, compile included")
    parser.add_argument("--compile-share", type=float, default=0.6,
                        help="at most this share of --time-budget goes to the parallel compile")
    parser.add_argument("--rep-ms", type=int, default=40, help="timing window per measurement")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help="processes compiling in parallel before the timing (0: none)")
    parser.add_argument("--output", default="", help="CSV to append to (default bench/results/sweep-<gpu>.csv)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--emit-table", nargs="+", metavar="CSV", help="write kernels/tuned_tables.py from sweep CSVs")
    parser.add_argument("--table-path", default=str(Path(__file__).resolve().parents[1] / "kernels" /
                                                    "tuned_tables.py"))
    args = parser.parse_args(argv)
    if args.emit_table:
        count = emit_table(args.emit_table, args.table_path)
        print(f"bench.sweep: {count} tuned configs written to {args.table_path}")
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fa_triton's kernels are imported
    output = run_sweep(args)
    print(f"bench.sweep: results in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
