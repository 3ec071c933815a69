"""One-call GPU sweep: every kernel variant and launch config at the target shapes, beside cuBLAS.

    python -m bench.sweep                              # the whole sweep (a GPU, <= 8 minutes cold)
    python -m bench.sweep --mode chosen                # only the configs fa_triton picks (gpu_check.sh)
    python -m bench.sweep --emit-table bench/results/sweep-<gpu>.csv   # -> kernels/tuned_tables.py
    python -m bench.sweep --dry-run                    # CPU: interpreter, tiny shapes (CI)

Targets (issue "Kernels at cuBLAS speed on Hopper"): square layers M = N = K = 8192 and 4096 in
bf16, fp16, fp32 with tf32 and fp32 IEEE; the tutorial's layers 784→128, 128→64 (relu) and 64→10
(identity) at batch 8192 and 64 in fp32 (IEEE and tf32) and bf16.

Jobs per target, each timed beside the cuBLAS GEMM of the same shape and layout (``torch.mm``):

=========================== ================================== ===================
job                         fa_triton launch                   cuBLAS
=========================== ================================== ===================
forward                     y = f(x Wᵀ + b) (+ f's extra)      x @ W.t()
backward_input              grad_x = δ B, storing δ            δ @ B
backward_weight_delta       grad_W = δᵀ x, grad_b (δ given)    δ.t() @ x
backward_weight             the same forming δ from g (fused)  δ.t() @ x
=========================== ================================== ===================

Each job is run with every autotuning candidate (``kernels.tuning.candidate_configs``: tiles,
split reductions, TMA variants) in ``--mode sweep``, or with the config fa_triton picks by
itself in ``--mode chosen``. GPU time: ``triton.testing.do_bench`` (L2 flushed) for large
problems, replay of a CUDA graph for launch-bound ones (< 2²⁶ multiply-adds), the same timer
for cuBLAS. Every result is checked against PyTorch's (``err``: max |diff| / max |torch|).

Cold caches: before timing, all configs are compiled in parallel worker processes (Triton's
``run(..., warmup=True)`` fills its on-disk cache), then timed one by one in priority order
until ``--time-budget`` seconds have passed; rows are appended to the CSV as they come.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

COLUMNS = ("gpu", "torch", "triton", "commit", "target", "job", "kernel", "dtype", "precision", "activation",
           "M", "K", "N", "config", "block_rows", "block_cols", "block_red", "num_warps", "num_stages", "split",
           "tma", "chosen", "ms", "cublas_ms", "ratio_vs_cublas", "tflops", "err", "status", "key")
SMALL_MACS = 1 << 26
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "tf32": 5e-3, "fp32": 1e-4}
TUTORIAL_LAYERS = ((784, 128, "relu"), (128, 64, "relu"), (64, 10, "identity"))
JOBS = ("forward", "backward_input", "backward_weight_delta", "backward_weight")
KERNEL_OF_JOB = {"forward": "forward", "backward_input": "backward_input", "backward_weight_delta": "backward_weight",
                 "backward_weight": "backward_weight"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One layer shape in one dtype: M rows, K = in_features, N = out_features."""

    name: str
    M: int
    K: int
    N: int
    activation: str
    dtype: str  # bf16, fp16, tf32 (fp32 tensors, tf32 allowed) or fp32 (IEEE)


def targets(dry_run: bool = False) -> list[Target]:
    """In priority order: issue item 1 (16-bit squares), item 3 (tutorial layers), item 2 (fp32)."""
    if dry_run:  # the interpreter: tiny shapes, every path once
        return [Target("square", 48, 48, 48, "relu", "fp16"), Target("tutorial", 40, 24, 10, "identity", "fp32"),
                Target("tutorial", 20, 32, 16, "gelu", "tf32")]
    out = [Target("square", n, n, n, "relu", dtype) for dtype in ("bf16", "fp16") for n in (8192, 4096)]
    for dtype in ("fp32", "bf16", "tf32"):
        for M in (8192, 64):
            out += [Target("tutorial", M, K, N, act, dtype) for K, N, act in TUTORIAL_LAYERS]
    out += [Target("square", n, n, n, "relu", dtype) for dtype in ("tf32", "fp32") for n in (8192, 4096)]
    return out


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


class Problem:
    """The tensors of one target and the launches of each job (fa_triton and cuBLAS)."""

    def __init__(self, target: Target, device: str):
        import torch

        from fa_triton.activations import apply_activation, extra_for_backward, saves_extra

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
        self.store_extra = saves_extra(t.activation, 0.01)
        with _Precision(t.dtype):
            z = torch.nn.functional.linear(self.x, self.weight, self.bias)
            self.y = apply_activation(z, t.activation, 0.01)
            self.extra = extra_for_backward(z, t.activation) if self.store_extra else None
            self.saved = None if t.activation == "identity" else (self.extra if self.store_extra else self.y)
            from fa_triton.activations import activation_backward

            self.delta = activation_backward(self.grad_y, self.saved, t.activation, 0.01).contiguous()
            self.expected = {
                "forward": self.y,
                "backward_input": self.delta @ self.feedback,
                "backward_weight": self.delta.t() @ self.x,
            }
            self.expected["backward_weight_delta"] = self.expected["backward_weight"]
        self.out_y = torch.empty_like(self.y)
        self.out_extra = torch.empty_like(self.y) if self.store_extra else None
        self.out_delta = torch.empty_like(self.grad_y)
        self.out_grad_x = torch.empty_like(self.x)
        self.out_grad_w, self.out_grad_b = torch.empty_like(self.weight), torch.empty_like(self.bias)

    def jobs(self) -> list[str]:
        # With f = identity δ is g: nothing to store, and the weight kernel has no prologue.
        if self.target.activation == "identity":
            return ["forward", "backward_input", "backward_weight"]
        return list(JOBS)

    def sizes(self, job: str) -> tuple[int, int, int, str]:
        """(rows, cols, red, batch axis) of the job's kernel, as kernels.tuning names them."""
        t = self.target
        return {"forward": (t.M, t.N, t.K, "rows"), "backward_input": (t.M, t.K, t.N, "rows")}.get(
            KERNEL_OF_JOB[job], (t.N, t.K, t.M, "red"))

    def store(self, job: str) -> bool:
        if job == "forward":
            return self.store_extra
        return job == "backward_input" and self.target.activation != "identity"

    def tma_layout(self, job: str) -> bool:
        """Whether the job's operands allow the tensor-descriptor kernels (as the launcher decides)."""
        from fa_triton.kernels import fa_linear

        kernel = KERNEL_OF_JOB[job]
        tensors = {"forward": (self.x, self.weight, self.out_y),
                   "backward_input": (self.grad_y, self.feedback, self.out_grad_x)}.get(kernel, (self.grad_y, self.x))
        return fa_linear._tma_layout(*tensors)

    def precision(self) -> str:
        """The dot precision the kernels use for this target (fp32 IEEE unless tf32 is allowed)."""
        return "ieee" if self.target.dtype == "fp32" else "tf32"

    def activation(self, job: str) -> str:
        return "identity" if job == "backward_weight_delta" else self.target.activation

    def launch(self, job: str, config):
        """A callable running the job's fa_triton launch (``config`` None: fa_triton's own pick)."""
        from fa_triton import kernels

        act = self.target.activation
        if job == "forward":
            return lambda: kernels.fa_linear_forward(self.x, self.weight, self.bias, act, 0.01, self.store_extra,
                                                     self.out_y, config=config)
        if job == "backward_input":
            delta = self.out_delta if self.store(job) else None
            return lambda: kernels.fa_linear_backward_input(self.grad_y, self.saved, self.feedback, act, 0.01,
                                                            config=config, delta_out=delta, out=self.out_grad_x)
        if job == "backward_weight_delta":
            return lambda: kernels.fa_linear_backward_weight(self.delta, None, self.x, "identity", 0.01, True,
                                                             config=config, out=(self.out_grad_w, self.out_grad_b))
        return lambda: kernels.fa_linear_backward_weight(self.grad_y, self.saved, self.x, act, 0.01, True,
                                                         config=config, out=(self.out_grad_w, self.out_grad_b))

    def output(self, job: str):
        return {"forward": self.out_y, "backward_input": self.out_grad_x}.get(job, self.out_grad_w)

    def cublas(self, job: str):
        import torch

        if job == "forward":
            wt = self.weight.t()
            return lambda: torch.mm(self.x, wt)
        if job == "backward_input":
            return lambda: torch.mm(self.delta, self.feedback)
        dt = self.delta.t()
        return lambda: torch.mm(dt, self.x)


def candidates(problem: Problem, job: str, device: str) -> list:
    """The configs timed for a job: the autotuning candidates (heuristic first)."""
    import torch

    from fa_triton.kernels import tuning

    rows, cols, red, _ = problem.sizes(job)
    kernel = KERNEL_OF_JOB[job]
    dev = torch.device(device)
    if device == "cpu":  # dry run: the interpreter's heuristic, one small tile, its TMA variant
        heuristic = tuning.heuristic_config(kernel, rows, cols, red, problem.x.dtype, 1, True, True)
        small = tuning.LaunchConfig(16, 16, 16, split=2 if kernel != "backward_input" else 1)
        return [heuristic, small] + ([small.replace(split=1, tma=True)] if problem.tma_layout(job) else [])
    tma = tuning.tma_allowed(dev, problem.tma_layout(job), problem.precision())
    return tuning.candidate_configs(kernel, rows, cols, red, problem.x.dtype, tuning.sm_count(dev), True, tma)


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

def _warm_worker(args) -> int:
    """Compile (not run) the given (target, job, config) launches: fills Triton's disk cache."""
    items, device = args
    from fa_triton.kernels import fa_linear_kernels

    for name in fa_linear_kernels.KERNEL_NAMES:
        kernel = getattr(fa_linear_kernels, name)
        kernel.run = (lambda run: lambda *a, grid, warmup, **kw: run(*a, grid=grid, warmup=True, **kw))(kernel.run)
    done, problems = 0, {}
    for target, job, config in items:
        try:
            if target not in problems:
                problems = {target: Problem(target, device)}  # one problem's tensors at a time
            with _Precision(target.dtype):
                problems[target].launch(job, config)()
            done += 1
        except Exception:  # noqa: BLE001 - the timing phase records the failure
            pass
    return done


def warm_compile(items: list, device: str, workers: int) -> None:
    if workers <= 0 or not items:
        return
    import multiprocessing

    chunks = [items[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_warm_worker, [(chunk, device) for chunk in chunks if chunk]))


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
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "commit": commit}


def _error(got, expected) -> float:
    scale = max(float(expected.abs().max()), 1e-30)
    return float((got.float() - expected.float()).abs().max()) / scale


def run_sweep(args) -> Path:
    import torch

    from fa_triton.kernels import fa_linear, tuning

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.sweep needs a CUDA GPU (or --dry-run)")
    env = _environment(device)
    output = Path(args.output or f"bench/results/sweep-{env['gpu'].lower().replace(' ', '-')}.csv")
    output.parent.mkdir(parents=True, exist_ok=True)
    new_file = not output.exists()
    timer = cpu_ms if device == "cpu" else gpu_ms
    start = time.monotonic()
    chosen_mode = args.mode == "chosen"
    wanted = [t for t in targets(args.dry_run) if not args.dtypes or t.dtype in args.dtypes.split(",")]

    # Phase 1: what will be timed, and every config that timing or tuning will launch, compiled
    # in parallel (in chosen mode the tuner's candidates, unless the sweep's table has the key).
    plan, compile_list = [], []
    for target in wanted:
        problem = Problem(target, device)
        for job in problem.jobs():
            configs = candidates(problem, job, device)
            if chosen_mode:
                plan.append((target, job, None))
                if _table_key(problem, job, device) not in tuning.TABLE:
                    compile_list += [(target, job, config) for config in configs]
            else:
                plan += [(target, job, config) for config in configs]
        del problem
    try:
        warm_compile(plan if not chosen_mode else compile_list, device, args.workers)
    except Exception as err:  # noqa: BLE001 - the timing below compiles what is missing, one by one
        print(f"bench.sweep: the parallel compile failed ({type(err).__name__}: {err}); compiling while timing",
              flush=True)
    print(f"bench.sweep: {len(plan)} launches to time on {env['gpu']}; compiled in "
          f"{time.monotonic() - start:.0f} s", flush=True)

    with output.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        problem, cublas = None, {}
        for target, job, config in plan:
            if time.monotonic() - start > args.time_budget:
                print(f"bench.sweep: time budget of {args.time_budget} s reached; rows so far are in {output}")
                break
            if problem is None or problem.target != target:
                problem, cublas = None, {}
                try:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    problem = Problem(target, device)
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: the other targets go on
                    print(f"bench.sweep: {target} skipped ({type(err).__name__}: {err})", flush=True)
                    continue
            small = target.M * target.N * target.K < SMALL_MACS
            row = dict(env, target=target.name, job=job, kernel=KERNEL_OF_JOB[job], dtype=target.dtype,
                       precision=problem.precision(), activation=problem.activation(job),
                       M=target.M, K=target.K, N=target.N, chosen=config is None)
            with _Precision(target.dtype):
                if job not in cublas:
                    try:
                        cublas[job] = timer(problem.cublas(job), small, args.rep_ms)
                    except Exception as err:  # noqa: BLE001
                        cublas[job] = float("nan")
                        print(f"cuBLAS {target} {job}: {type(err).__name__}: {err}")
                try:
                    fn = problem.launch(job, config)
                    if config is None:  # the config fa_triton picks: the one plan the first call builds
                        fa_linear.clear_plans()
                        fn()
                        config = next(iter(fa_linear._PLANS.values())).config
                    else:
                        fn()
                    err = _error(problem.output(job), problem.expected[job])
                    ms = timer(fn, small, args.rep_ms)
                    status = "ok" if err <= TOLERANCE[target.dtype] else "wrong"
                except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
                    ms, err, status = float("nan"), float("nan"), f"failed: {type(error).__name__}: {str(error)[:200]}"
            flops = 2.0 * target.M * target.N * target.K
            row.update(ms=ms, cublas_ms=cublas[job], ratio_vs_cublas=ms / cublas[job] if cublas[job] else float("nan"),
                       tflops=flops / ms / 1e9 if ms == ms and ms > 0 else float("nan"), err=err, status=status)
            if config is not None:
                row.update(config=_describe(config), **{k: v for k, v in dataclasses.asdict(config).items()
                                                        if k in COLUMNS})
                row["key"] = repr(_table_key(problem, job, device)[1:])
            writer.writerow(row)
            f.flush()
            print(f"{target.name:8s} {target.dtype:4s} {target.M:>5d}x{target.K:<5d}->{target.N:<5d} {job:22s} "
                  f"{row.get('config', '?'):34s} {ms:8.4f} ms  cuBLAS {cublas[job]:8.4f} ms  "
                  f"x{row['ratio_vs_cublas']:.2f}  err {err:.1e} {status if status != 'ok' else ''}", flush=True)
    return output


def _table_key(problem: Problem, job: str, device: str) -> tuple:
    """(GPU name,) + the tuner's problem_key of a job: what tuned_tables.TABLE is keyed by."""
    import torch

    from fa_triton.kernels import tuning

    rows, cols, red, batch_axis = problem.sizes(job)
    kernel = KERNEL_OF_JOB[job]
    dev = torch.device(device)
    return (tuning.device_name(dev),) + tuning.problem_key(
        kernel, rows, cols, red, batch_axis, dtype=problem.x.dtype, precision=problem.precision(),
        activation=problem.activation(job), bias_grad=kernel == "backward_weight", store=problem.store(job),
        tma=tuning.tma_allowed(dev, problem.tma_layout(job), problem.precision()))


def _describe(config) -> str:
    text = f"{config.block_rows}x{config.block_cols}x{config.block_red} w{config.num_warps} s{config.num_stages}"
    return text + (f" split{config.split}" if config.split > 1 else "") + (" tma" if config.tma else "")


# ---------------------------------------------------------------------------- the table

def emit_table(csv_paths: list[str], out_path: str) -> int:
    """Write kernels/tuned_tables.py: per (GPU, key) the fastest correct config of the CSVs."""
    best: dict[tuple, tuple[float, dict]] = {}
    for path in csv_paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["status"] != "ok" or not row["key"] or row["chosen"] == "True":
                    continue
                ms = float(row["ms"])
                key = (row["gpu"],) + eval(row["key"], {"__builtins__": {}})  # a repr'd tuple of literals
                fields = {k: int(row[k]) for k in ("block_rows", "block_cols", "block_red", "num_warps", "num_stages",
                                                   "split")}
                fields["tma"] = row["tma"] == "True"
                if key not in best or ms < best[key][0]:
                    best[key] = (ms, fields)
    lines = [
        '"""Launch configs measured on real GPUs by ``bench/sweep.py`` (``--emit-table`` wrote this file).',
        "",
        "Keys: (GPU name as torch reports it,) + ``tuning.problem_key(...)`` — kernel, dtype name, dot",
        "precision, activation, flags, TMA allowed, sizes with the batch bucketed; values: the fields of",
        "the fastest ``LaunchConfig`` measured for that key (a dict). A key found here is used without",
        "tuning; any other key is tuned at run time (see ``tuning.select_config``).",
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
    parser.add_argument("--dtypes", default="", help="only these target dtypes (bf16,fp16,tf32,fp32)")
    parser.add_argument("--time-budget", type=float, default=420, help="seconds, compile included")
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
