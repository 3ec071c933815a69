"""Time fa_triton (backend="auto" and Triton-only) against the reference, nn.Linear backprop and
torch.compile, in one process.

    python -m bench.run                       # preset "full" on a GPU, "cpu" without one
    python -m bench.run --preset gpu-check --time-budget 200 --plot
    python -m bench.run --providers fa_triton_auto,fa_triton,reference --families square --square-sizes 4096 \
        --dtypes bf16

Each measurement appends long-format rows to the CSV (default ``bench/results/<device>.csv``):
time (ms), throughput (TFLOP/s), bandwidth (GB/s), the share of the ceilings measured at the
start of the run (``pct_mm_peak``, ``pct_copy_peak``, ``pct_roofline``), and the speedup over
``reference``. See bench/cases.py for what each provider and mode runs, bench/timing.py for
how it is timed.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Without a GPU fa_triton's kernels run through Triton's interpreter, which must be chosen
    # before triton.language is first imported (importing fa_triton, in bench.cases, does that).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import cases as C  # noqa: E402
from .report import summary_lines, target_lines  # noqa: E402
from .results import append_rows, default_csv_path, environment, make_row, slug  # noqa: E402
from .timing import matmul_precision, peak_copy, peak_matmul, time_bench  # noqa: E402

# Failures of these providers are errors (exit status 1); torch.compile may fail "where it
# does not work": that is recorded, not fatal.
MUST_WORK = ("fa_triton_auto", "fa_triton", "reference", "backprop")


@dataclass(frozen=True)
class Item:
    """One measurement group: a case in one dtype and mode, timed for several providers."""

    case: C.Case
    dtype: str
    mode: str
    providers: tuple[str, ...]


PRESETS = {
    # CI: tiny shapes; every code path once (the interpreter runs fa_triton on CPU).
    "smoke": dict(families="tutorial,square,mlp", batches="8", square_sizes="32", mlp_batches="8",
                  dtypes="fp32,bf16", modes=",".join(C.MODES), providers="reference,fa_triton_auto,fa_triton,backprop",
                  warmup_ms=0.0, rep_ms=1.0, mm_size=64, copy_mb=1),
    # A CPU: the tutorial's sizes and one square layer, fp32 (CPU bf16 matmuls can be very slow);
    # fa_triton's interpreter runs only the small ones (and "auto" is the reference off CUDA: not timed twice).
    "cpu": dict(families="tutorial,square,mlp", batches="64,8192", square_sizes="1024", mlp_batches="64,8192",
                dtypes="fp32", modes=",".join(C.MODES), providers="reference,fa_triton,backprop,compiled",
                warmup_ms=50.0, rep_ms=300.0, mm_size=1024, copy_mb=256),
    # Everything the issue lists.
    "full": dict(families="tutorial,square,mlp", batches="64,8192", square_sizes="1024,2048,4096,8192",
                 mlp_batches="64,8192", dtypes="fp32,tf32,bf16,fp16", modes=",".join(C.MODES),
                 providers=",".join(C.PROVIDERS), warmup_ms=25.0, rep_ms=100.0, mm_size=8192, copy_mb=1024),
    # bench/gpu_check.sh: the targets first, then more until --time-budget runs out. No torch.compile
    # (tens of seconds per graph): --providers ...,compiled adds it, after everything else.
    "gpu-check": dict(families="tutorial,square,mlp", batches="64,8192", square_sizes="1024,2048,4096,8192",
                      mlp_batches="64,8192", dtypes="fp32,tf32,bf16,fp16", modes=",".join(C.MODES),
                      providers="reference,fa_triton_auto,fa_triton,backprop", warmup_ms=10.0, rep_ms=50.0,
                      mm_size=8192, copy_mb=1024),
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str, allowed, what: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"error: --{what} got {bad}; choose from {list(allowed)}")
    return names


def _ordered(providers) -> tuple[str, ...]:
    # The reference first: every other provider's ratio is taken against it.
    return tuple(sorted(providers, key=lambda p: p != "reference"))


def gpu_check_plan(args) -> list[Item]:
    """The issue's layer targets first — fwd+bwd of the 8192^3 and 4096^3 squares in bf16, fp16
    and fp32 with tf32, then the tutorial's layers at batch 8192 and 64 in fp32 — then the MLP's
    train step, IEEE fp32 squares, the tutorial's layers in bf16 and the other sizes, dtypes and
    modes in order of interest. torch.compile costs tens of seconds per graph, so the compiled
    provider of each group comes after all the others (its ratio uses the reference time
    measured earlier in the run)."""
    eager = _ordered(p for p in args.providers if p != "compiled")
    tutorial = C.tutorial_cases
    square_8192 = C.Case("square", 8192, 8192, 8192)
    targets = [(c, d, "forward_backward") for d in ("bf16", "fp16", "tf32") for c in C.square_cases([8192, 4096])]
    targets += [(c, "fp32", "forward_backward") for c in tutorial([8192, 64])]
    others = [(c, "fp32", "train_step") for c in C.mlp_cases([64, 8192])]
    others += [(c, "fp32", "forward_backward") for c in C.square_cases([8192, 4096])]
    others += [(c, "bf16", "forward_backward") for c in tutorial([8192, 64])]
    others += [(c, "bf16", "train_step") for c in C.mlp_cases([64, 8192])]
    others += [(square_8192, "bf16", m) for m in ("forward", "backward")]
    others += [(c, "bf16", "forward_backward") for c in C.square_cases([1024, 2048])]
    listed = set(targets + others)
    others += [(i.case, i.dtype, i.mode) for i in grid_plan(args) if (i.case, i.dtype, i.mode) not in listed]

    plan = []
    for group in (targets, others):
        if eager:
            plan += [Item(case, dtype, mode, eager) for case, dtype, mode in group]
        if "compiled" in args.providers:
            plan += [Item(case, dtype, mode, ("compiled",)) for case, dtype, mode in group]
    return [i for i in plan if _selected(i, args)]


def _selected(item: Item, args) -> bool:
    case = item.case
    if case.family not in args.families or item.dtype not in args.dtypes or item.mode not in args.modes:
        return False
    if case.family == "tutorial" and case.M not in args.batches:
        return False
    if case.family == "square" and case.M not in args.square_sizes:
        return False
    return not (case.family == "mlp" and case.M not in args.mlp_batches)


def grid_plan(args) -> list[Item]:
    """Every selected case x dtype x mode."""
    found: list[C.Case] = []
    if "tutorial" in args.families:
        found += C.tutorial_cases(args.batches)
    if "square" in args.families:
        found += C.square_cases(args.square_sizes)
    if "mlp" in args.families:
        found += C.mlp_cases(args.mlp_batches)
    providers = _ordered(args.providers)
    return [Item(case, dtype, mode, providers)
            for case in found for dtype in args.dtypes for mode in case.modes if mode in args.modes]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="defaults for the options below "
                        "(default: full on a GPU, cpu otherwise)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    parser.add_argument("--providers", help=f"comma-separated subset of {','.join(C.PROVIDERS)}")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(C.MODES)}")
    parser.add_argument("--dtypes", help=f"comma-separated subset of {','.join(C.DTYPES)}")
    parser.add_argument("--families", help=f"comma-separated subset of {','.join(C.FAMILIES)}")
    parser.add_argument("--batches", help="batch sizes M of the tutorial's layers (default 64,8192)")
    parser.add_argument("--square-sizes", help="sizes of the square M=N=K layers (default 1024,...,8192)")
    parser.add_argument("--mlp-batches", help="batch sizes of the MLP training step (default 64,8192)")
    parser.add_argument("--output", type=Path, help="CSV to append to (default bench/results/<device>.csv)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no new measurement after this (the table is still printed)")
    parser.add_argument("--warmup-ms", type=float, help="warm-up time per measurement")
    parser.add_argument("--rep-ms", type=float, help="timed repetitions per measurement, in ms")
    parser.add_argument("--mm-size", type=int, help="size of the torch.mm that measures the compute ceiling")
    parser.add_argument("--copy-mb", type=int, help="MiB of the device copy that measures the bandwidth ceiling")
    parser.add_argument("--no-peaks", action="store_true", help="skip the ceiling measurements")
    parser.add_argument("--plot", action="store_true", help="draw the PNGs (bench.plot) next to the CSV")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--no-summary", action="store_true", help="do not print the targets and summary table")
    args = parser.parse_args(argv)

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    args.device = torch.device(device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch finds no CUDA device")
    preset = PRESETS[args.preset or ("full" if args.device.type == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.providers = _names(args.providers, C.PROVIDERS, "providers")
    args.modes = _names(args.modes, C.MODES, "modes")
    args.dtypes = _names(args.dtypes, C.DTYPES, "dtypes")
    args.families = _names(args.families, C.FAMILIES, "families")
    args.batches, args.square_sizes, args.mlp_batches = (
        _ints(args.batches), _ints(args.square_sizes), _ints(args.mlp_batches))
    return args


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:300]


def _metric_rows(env, item: Item, provider: str, times, peaks: dict, reference_ms: float | None) -> list[dict]:
    case, mode, dtype = item.case, item.mode, item.dtype
    element_size = torch.empty((), dtype=C.DTYPES[dtype]).element_size()
    work, nbytes = C.flops(case, mode), C.min_bytes(case, mode, element_size)
    t50, t20, t80 = times
    common = dict(kernel=case.kernel, provider=provider, mode=mode, dtype=dtype, M=case.M, N=case.N, K=case.K)

    def rate(amount, scale):  # a rate's p20 comes from the p80 time
        return dict(p50=amount / (t50 * 1e-3) / scale, p20=amount / (t80 * 1e-3) / scale,
                    p80=amount / (t20 * 1e-3) / scale)

    rows = [make_row(env, **common, metric="time", unit="ms", p50=t50, p20=t20, p80=t80),
            make_row(env, **common, metric="throughput", unit="TFLOP/s", **rate(work, 1e12)),
            make_row(env, **common, metric="bandwidth", unit="GB/s", **rate(nbytes, 1e9))]
    mm, copy = peaks.get(dtype), peaks.get("copy")
    if mm:
        rows.append(make_row(env, **common, metric="pct_mm_peak", unit="%", **rate(work, mm / 100)))
    if copy:
        rows.append(make_row(env, **common, metric="pct_copy_peak", unit="%", **rate(nbytes, copy / 100)))
    if mm and copy:
        floor_s = max(work / mm, nbytes / copy)  # the roofline: the slower of the two ceilings
        rows.append(make_row(env, **common, metric="pct_roofline", unit="%", **rate(floor_s, 1 / 100)))
    if reference_ms is not None:
        rows.append(make_row(env, **common, metric="speedup_vs_reference", unit="x", p50=reference_ms / t50))
    return rows


def _describe(rows: list[dict]) -> str:
    """One measurement's rows as a line: ms, TFLOP/s and GB/s with their share of the ceilings, ratio."""
    value = {r["metric"]: float(r["p50"]) for r in rows if r["p50"]}
    time_row = next(r for r in rows if r["metric"] == "time")
    parts = [f"{value['time']:.4g} ms (p20 {float(time_row['p20']):.4g}, p80 {float(time_row['p80']):.4g})"]
    for metric, unit, share, ceiling in (("throughput", "TFLOP/s", "pct_mm_peak", "mm"),
                                         ("bandwidth", "GB/s", "pct_copy_peak", "copy")):
        text = f"{value[metric]:.4g} {unit}"
        if share in value:
            text += f" = {value[share]:.3g}% of {ceiling}"
        parts.append(text)
    if "pct_roofline" in value:
        parts.append(f"{value['pct_roofline']:.3g}% of roofline")
    if "speedup_vs_reference" in value:
        parts.append(f"{value['speedup_vs_reference']:.3g}x vs reference")
    return " | ".join(parts)


def measure_peaks(args, env, log) -> tuple[dict, list[dict]]:
    """The device's ceilings in this run: torch.mm rate per dtype (FLOP/s), copy rate (B/s)."""
    peaks, rows = {}, []
    timer = dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    for dtype in args.dtypes:
        if dtype == "tf32" and args.device.type != "cuda":
            continue
        with matmul_precision(dtype == "tf32"):
            try:
                times, work = peak_matmul(C.DTYPES[dtype], args.device, args.mm_size, **timer)
            except Exception as err:  # noqa: BLE001 - a missing ceiling only drops the % columns
                log(f"peak torch.mm {dtype}: failed ({_reason(err)})")
                continue
        peaks[dtype] = work / (times[0] * 1e-3)
        rows.append(make_row(env, kernel="peak_mm", provider="torch", mode="mm", dtype=dtype, M=args.mm_size,
                             N=args.mm_size, K=args.mm_size, metric="throughput", unit="TFLOP/s",
                             p50=work / times[0] / 1e9, p20=work / times[2] / 1e9, p80=work / times[1] / 1e9))
        log(f"peak torch.mm {dtype} {args.mm_size}^3: {peaks[dtype] / 1e12:.4g} TFLOP/s")
    nbytes = args.copy_mb * 2**20
    times, moved = peak_copy(args.device, nbytes, **timer)
    peaks["copy"] = moved / (times[0] * 1e-3)
    rows.append(make_row(env, kernel="peak_copy", provider="torch", mode="copy", dtype="uint8", M=nbytes, N=1, K=1,
                         metric="bandwidth", unit="GB/s", p50=moved / times[0] / 1e6, p20=moved / times[2] / 1e6,
                         p80=moved / times[1] / 1e6))
    log(f"peak copy {args.copy_mb} MiB: {peaks['copy'] / 1e9:.4g} GB/s (read + write)")
    return peaks, rows


def run_item(item: Item, args, env, peaks: dict, log, reference_times: dict | None = None
             ) -> tuple[list[dict], list[str]]:
    """Time every provider of one item; returns its rows and the errors of must-work providers.

    `reference_times` maps (case, dtype, mode) to the reference's median ms: filled here, and
    read for the ratios of items that do not time the reference themselves.
    """
    reference_times = {} if reference_times is None else reference_times
    rows, errors = [], []
    case = item.case
    key = (case, item.dtype, item.mode)
    for provider in item.providers:
        label = C.provider_label(provider, args.device)
        common = dict(kernel=case.kernel, provider=label, mode=item.mode, dtype=item.dtype,
                      M=case.M, N=case.N, K=case.K)
        head = f"{case.label()} {item.dtype} {item.mode} {label}"
        reason = C.unsupported_reason(case, provider, item.dtype, args.device)
        if reason:
            rows.append(make_row(env, **common, metric="skipped", unit=reason))
            log(f"  {head}: skipped ({reason})")
            continue
        bench = None
        try:
            with matmul_precision(item.dtype == "tf32"):
                bench = C.build(case, provider, item.mode, item.dtype, args.device)
                times = time_bench(bench, args.device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        except Exception as err:  # noqa: BLE001 - recorded in the CSV; fatal below for must-work providers
            rows.append(make_row(env, **common, metric="failed", unit=_reason(err)))
            log(f"  {head}: FAILED ({_reason(err)})")
            if provider in MUST_WORK:
                errors.append(f"{head}: {_reason(err)}")
            continue
        finally:
            del bench
            gc.collect()
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
        if provider == "reference":
            reference_times[key] = times[0]
        new = _metric_rows(env, item, label, times, peaks, reference_times.get(key))
        rows += new
        log(f"  {head}: {_describe(new)}")
    return rows, errors


def main(argv=None) -> int:
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.device.type == "cpu" and "fa_triton" in args.providers:
        # The kernels run on CPU tensors only through the interpreter, chosen when they are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    env = environment(args.device)
    output = args.output or default_csv_path(args.device)
    log(f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    log(f"results: {output}")

    plan = gpu_check_plan(args) if args.preset == "gpu-check" else grid_plan(args)
    all_rows: list[dict] = []
    peaks: dict = {}
    if not args.no_peaks:
        peaks, rows = measure_peaks(args, env, log)
        append_rows(output, rows)
        all_rows += rows
    errors, skipped, reference_times = [], 0, {}
    for item in plan:
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            skipped += 1
            continue
        rows, item_errors = run_item(item, args, env, peaks, log, reference_times)
        append_rows(output, rows)  # written as it goes: an interrupted run keeps what it measured
        all_rows += rows
        errors += item_errors
    if skipped:
        log(f"time budget of {args.time_budget:.0f} s reached: {skipped} of {len(plan)} measurement groups not run")
    log(f"{len(all_rows)} rows appended to {output} in {time.monotonic() - started:.0f} s")

    if args.plot:
        from . import plot

        try:
            for path in plot.plot_csv(output, output.parent, prefix=slug(env["device_name"])):
                log(f"plot: {path}")
        except ImportError as err:
            print(f"no plots: {err}", file=sys.stderr)
    if not args.no_summary:
        print()
        print("\n".join(target_lines(all_rows)))
        print()
        print("\n".join(summary_lines(all_rows)))
    if errors:
        print(f"\n{len(errors)} measurement(s) of {', '.join(MUST_WORK)} failed:", file=sys.stderr)
        for line in errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
