"""The short summary of a benchmark run: the issue's targets, each kernel beside cuBLAS and the
tutorial GEMM, and a table of fa_triton (auto and Triton-only) against the reference.

    python -m bench.report bench/results/<device>.csv [--sweep bench/results/sweep-<device>.csv] [--since T]

reads the newest row of every measurement in the CSVs and prints:

1. the targets (issue "Kernels at cuBLAS speed on Hopper"), each ``PASS``, ``FAIL`` or
   ``unmeasured``, from GPU rows only (a CPU run measures none of them):

   - each 16-bit GEMM kernel (forward, backward input, backward weight) ≥ 0.95× the speed of the
     cuBLAS GEMM of the same shape and layout (``bench.sweep --mode chosen`` rows; M = N = K =
     8192 and 4096 in bf16 and fp16 listed even when unmeasured);
   - ``backend="auto"`` fwd+bwd ≥ 1.0× the reference at every benchmarked shape, and ≥ 1.05× at
     8192³ bf16;
   - the tutorial's layers at batch 8192: auto fwd+bwd ≥ 1.3× the reference;

   and, reported without a target, Triton-only (``backend="triton"``) fwd+bwd against the reference;
2. with ``--sweep``, one line per kernel of the chosen configs: ms, × cuBLAS, × the tutorial GEMM
   (its default tile, and the chosen config's tile where timed), GB/s of the δ pass and × the
   unfused torch ops;
3. the table::

       shape | dtype | mode | auto ms | triton ms | reference ms | auto x ref | triton x ref | % of peak

Ratios are speed ratios: the other's time / fa_triton's time (above 1: fa_triton is faster).
``% of peak`` is the auto provider's (else Triton's) share of the roofline built from the
ceilings measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

from .results import latest_run, read_rows

MODE_SHORT = {"forward": "fwd", "backward": "bwd", "forward_backward": "fwd+bwd", "train_step": "train step"}
AUTO = "fa_triton_auto"
TRITON_PROVIDERS = ("fa_triton", "fa_triton_interpreter")
FA_PROVIDERS = (AUTO, *TRITON_PROVIDERS)

# The targets' thresholds.
KERNEL_MIN_X_CUBLAS = 0.95
AUTO_MIN_X_REFERENCE = 1.0
AUTO_MIN_X_REFERENCE_8192_BF16 = 1.05
TUTORIAL_MIN_X_REFERENCE = 1.3
TUTORIAL_LAYERS = ((784, 128, "relu"), (128, 64, "relu"), (64, 10, "identity"))
KERNEL_SHAPES = (("bf16", 8192), ("bf16", 4096), ("fp16", 8192), ("fp16", 4096))
GEMM_JOBS = ("forward", "backward_input", "backward_weight")
BASELINE_NAMES = {"cublas": "cuBLAS", "torch.mm": "torch.mm", "torch_unfused": "torch"}


def _value(row: dict | None) -> float | None:
    if row is None or row.get("p50") in (None, ""):
        return None
    return float(row["p50"])


def _index(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["kernel"], r["provider"], r["mode"], r["dtype"], int(r["M"]), int(r["N"]), int(r["K"]), r["metric"]): r
            for r in rows}


def _shape(kernel: str, M: int, N: int, K: int) -> str:
    if kernel.startswith("mlp"):
        return f"MLP {kernel.split('_', 1)[1]} batch {M}"
    return f"{M}x{K} -> {N} ({kernel.removeprefix('fa_linear_')})"


def _on_gpu(device_name: str) -> bool:
    return bool(device_name) and not device_name.startswith("CPU")


def _table(header: tuple, lines: list[tuple], left: int) -> list[str]:
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]

    def fmt(line):
        return " | ".join(str(cell).ljust(width) if i < left else str(cell).rjust(width)
                          for i, (cell, width) in enumerate(zip(line, widths)))

    return [fmt(header), "-+-".join("-" * w for w in widths), *(fmt(line) for line in lines)]


# ------------------------------------------------------------------------- the layer table

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _ratio(reference_ms: float, value: float | None) -> str:
    return "-" if value is None else f"{reference_ms / value:.2f}x"


def summary_lines(rows: list[dict]) -> list[str]:
    """The table: every case timed with the reference and auto or Triton-only."""
    rows = latest_run(rows)
    index = _index(rows)
    cases = {(r["kernel"], r["mode"], r["dtype"], int(r["M"]), int(r["N"]), int(r["K"]))
             for r in rows if r["provider"] in FA_PROVIDERS and r["metric"] == "time"}
    mode_order = list(MODE_SHORT)

    def order(c):
        kernel, mode, dtype, M, N, K = c
        return (kernel.startswith("mlp"), M == N == K, M, -K, dtype, mode_order.index(mode) if mode in mode_order
                else 9)

    table = []
    for case in sorted(cases, key=order):
        kernel, mode, dtype, M, N, K = case
        time_of = {p: _value(index.get((kernel, p, mode, dtype, M, N, K, "time")))
                   for p in ("reference", *FA_PROVIDERS)}
        ref_ms, auto_ms = time_of["reference"], time_of[AUTO]
        triton = next((p for p in TRITON_PROVIDERS if time_of[p] is not None), None)
        triton_ms = time_of[triton] if triton else None
        if ref_ms is None or (auto_ms is None and triton_ms is None):
            continue
        peak_of = AUTO if auto_ms is not None else triton
        peak = _value(index.get((kernel, peak_of, mode, dtype, M, N, K, "pct_roofline")))
        name = _shape(kernel, M, N, K) + (" [interpreter]" if triton == "fa_triton_interpreter" else "")
        table.append((name, dtype, MODE_SHORT.get(mode, mode), _ms(auto_ms), _ms(triton_ms), f"{ref_ms:.4g}",
                      _ratio(ref_ms, auto_ms), _ratio(ref_ms, triton_ms), "-" if peak is None else f"{peak:.1f}%"))
    if not table:
        return ["(no case was timed with both fa_triton and reference)"]
    header = ("shape", "dtype", "mode", "auto ms", "triton ms", "reference ms", "auto x ref", "triton x ref",
              "% of peak")
    return _table(header, table, 3)


# ------------------------------------------------------------------------------ the targets

def _verdict(values: list[float | None], minimum: float) -> str:
    measured = [v for v in values if v is not None]
    if not measured:
        return "unmeasured"
    verdict = "PASS" if all(v >= minimum for v in measured) else "FAIL"
    return verdict + (" (partly measured)" if len(measured) < len(values) else "")


def _x(value: float | None) -> str:
    return "unmeasured" if value is None else f"{value:.2f}x"


def latest_sweep(sweep_rows: list[dict]) -> dict[tuple, dict]:
    """The newest chosen-config row of each (gpu, target, dtype, M, K, N, job) of a sweep CSV."""
    chosen = {}
    for row in sweep_rows:
        if row.get("chosen") == "True" and row.get("status") == "ok":
            chosen[(row["gpu"], row["target"], row["dtype"], int(row["M"]), int(row["K"]), int(row["N"]),
                    row["job"])] = row
    return chosen


def kernel_target_lines(sweep_rows: list[dict]) -> list[str]:
    """Each 16-bit GEMM kernel >= 0.95x cuBLAS of the same shape and layout (GPU rows only)."""
    chosen = {k: r for k, r in latest_sweep(sweep_rows).items() if _on_gpu(k[0])}
    shapes = {(k[2], k[3], k[4], k[5]) for k in chosen if k[2] in ("bf16", "fp16") and k[6] in GEMM_JOBS}
    shapes |= {(dtype, n, n, n) for dtype, n in KERNEL_SHAPES}
    lines, all_values = [], []
    for dtype, M, K, N in sorted(shapes, key=lambda s: (s[0], -s[1] * s[2] * s[3])):
        rows = {job: next((r for k, r in chosen.items() if k[2:6] == (dtype, M, K, N) and k[6] == job), None)
                for job in GEMM_JOBS}
        values = [None if r is None else float(r["x_baseline"]) for r in rows.values()]
        all_values += values
        shown = ", ".join(f"{job} {_x(v)}" for job, v in zip(GEMM_JOBS, values))
        tutorial = [r for r in rows.values() if r is not None and r.get("x_tutorial")]
        if tutorial:
            shown += " (x tutorial GEMM: " + ", ".join(f"{r['job']} {float(r['x_tutorial']):.2f}x"
                                                       for r in tutorial) + ")"
        shape = f"{M}^3" if M == K == N else f"{M}x{K}->{N}"
        lines.append(f"    {dtype} {shape}: {_verdict(values, KERNEL_MIN_X_CUBLAS)}: {shown}")
    head = (f"  each 16-bit kernel >= {KERNEL_MIN_X_CUBLAS}x cuBLAS of the same shape and layout (bench.sweep "
            f"--mode chosen): {_verdict(all_values, KERNEL_MIN_X_CUBLAS)}")
    return [head, *lines]


def layer_target_lines(rows: list[dict]) -> list[str]:
    """The layer-level targets of backend="auto" (GPU rows only), and Triton-only beside them."""
    rows = [r for r in latest_run(rows) if _on_gpu(r.get("device_name", ""))]
    index = _index(rows)

    def ratio(provider, kernel, dtype, M, N, K):
        return _value(index.get((kernel, provider, "forward_backward", dtype, M, N, K, "speedup_vs_reference")))

    measured = sorted({(r["kernel"], r["dtype"], int(r["M"]), int(r["N"]), int(r["K"])) for r in rows
                       if r["provider"] == AUTO and r["mode"] == "forward_backward"
                       and r["metric"] == "speedup_vs_reference"}, key=lambda c: (-c[2] * c[3] * c[4], c[1]))
    lines = []
    auto = [(c, ratio(AUTO, *c)) for c in measured]
    if auto:
        worst_case, worst = min(auto, key=lambda item: item[1])
        verdict = "PASS" if worst >= AUTO_MIN_X_REFERENCE else "FAIL"
        below = [f"{_shape(k, M, N, K)} {d} {v:.2f}x" for (k, d, M, N, K), v in auto if v < AUTO_MIN_X_REFERENCE]
        detail = f"{len(auto)} shapes; lowest {worst:.2f}x: {_shape(worst_case[0], *worst_case[2:])} {worst_case[1]}"
        lines.append(f"  auto fwd+bwd >= {AUTO_MIN_X_REFERENCE}x reference at every benchmarked shape: {verdict} "
                     f"({detail})" + (f"; below: {', '.join(below)}" if below else ""))
    else:
        lines.append(f"  auto fwd+bwd >= {AUTO_MIN_X_REFERENCE}x reference at every benchmarked shape: unmeasured")
    big = ratio(AUTO, "fa_linear_relu", "bf16", 8192, 8192, 8192)
    lines.append(f"  auto fwd+bwd >= {AUTO_MIN_X_REFERENCE_8192_BF16}x reference at 8192^3 bf16: "
                 f"{_verdict([big], AUTO_MIN_X_REFERENCE_8192_BF16)}: {_x(big)}")
    tutorial = []
    for K, N, activation in TUTORIAL_LAYERS:
        kernel = f"fa_linear_{activation}"
        dtypes = sorted({d for (k, d, M, n, kk) in measured if (k, M, n, kk) == (kernel, 8192, N, K)})
        for dtype in dtypes or ["fp32"]:
            tutorial.append((f"{K}->{N} {activation} {dtype}", ratio(AUTO, kernel, dtype, 8192, N, K)))
    lines.append(f"  tutorial layers at batch 8192, auto fwd+bwd >= {TUTORIAL_MIN_X_REFERENCE}x reference: "
                 f"{_verdict([v for _, v in tutorial], TUTORIAL_MIN_X_REFERENCE)}: "
                 + ", ".join(f"{name} {_x(v)}" for name, v in tutorial))
    triton = sorted({(r["kernel"], r["dtype"], int(r["M"]), int(r["N"]), int(r["K"])) for r in rows
                     if r["provider"] == "fa_triton" and r["mode"] == "forward_backward"
                     and r["metric"] == "speedup_vs_reference"}, key=lambda c: (-c[2] * c[3] * c[4], c[1]))
    lines.append("  (no target) Triton-only fwd+bwd vs reference:" + ("" if triton else " unmeasured"))
    shapes: dict[tuple, list[str]] = {}
    for k, d, M, N, K in triton:
        shapes.setdefault((k, M, N, K), []).append(f"{d} {ratio('fa_triton', k, d, M, N, K):.2f}x")
    lines += [f"    {_shape(k, M, N, K)}: {', '.join(shown)}" for (k, M, N, K), shown in shapes.items()]
    return lines


def target_lines(rows: list[dict], sweep_rows: list[dict] | None = None) -> list[str]:
    """The issue's targets, each PASS / FAIL / unmeasured, from GPU rows of the run and sweep CSVs."""
    gpus = sorted({r["device_name"] for r in rows if _on_gpu(r.get("device_name", ""))}
                  | {r["gpu"] for r in sweep_rows or () if _on_gpu(r.get("gpu", ""))})
    where = ", ".join(gpus) if gpus else "no GPU rows: every target unmeasured"
    return [f"targets ({where}):", *kernel_target_lines(sweep_rows or []), *layer_target_lines(rows)]


# ----------------------------------------------------------------------- per-kernel table

def kernel_lines(sweep_rows: list[dict]) -> list[str]:
    """One line per kernel of the chosen configs of a bench.sweep CSV (newest rows)."""
    chosen = latest_sweep(sweep_rows)
    if not chosen:
        return ["per kernel: no chosen-config rows of bench.sweep"]
    table = []

    def number(row, column, fmt):
        value = row.get(column)
        return "-" if value in (None, "") or value != value else fmt.format(float(value))

    for key, r in chosen.items():
        gpu, target, dtype, M, K, N, job = key
        gemm = job in GEMM_JOBS
        table.append((f"{M}x{K}->{N}", dtype, job, r.get("config", ""), number(r, "ms", "{:.4g}"),
                      f"{BASELINE_NAMES.get(r.get('baseline', ''), r.get('baseline', ''))} "
                      + number(r, "x_baseline", "{:.2f}x"),
                      number(r, "x_tutorial", "{:.2f}x"), number(r, "x_tutorial_same", "{:.2f}x"),
                      number(r, "tflops", "{:.1f}") if gemm else "-", number(r, "gbps", "{:.0f}")))
    devices = sorted({k[0] for k in chosen})
    header = ("shape", "dtype", "job", "config", "ms", "x baseline", "x tutorial", "x tut. same tile", "TFLOP/s",
              "GB/s")
    return [f"per kernel ({', '.join(devices)}; x = the other's time / fa_triton's time):", *_table(header, table, 4)]


def read_sweep(path: str, since: str | None = None) -> list[dict]:
    """The rows of a bench.sweep CSV (none when it was not written), those since ``since`` only."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if since:
        rows = [r for r in rows if r.get("timestamp", "") >= since]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="results CSV written by python -m bench.run")
    parser.add_argument("--since", help="only rows with a timestamp at or after this one (UTC, ISO 8601)")
    parser.add_argument("--sweep", help="a bench.sweep CSV: per-kernel targets of the configs fa_triton picks")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv) if os.path.exists(args.csv) else []
    if not rows:
        print(f"(no rows in {args.csv})")
    if args.since:
        rows = [r for r in rows if r["timestamp"] >= args.since]
    sweep_rows = read_sweep(args.sweep, args.since) if args.sweep else []
    print("\n".join(target_lines(rows, sweep_rows)))
    if args.sweep:
        print()
        print("\n".join(kernel_lines(sweep_rows)))
    print()
    print("\n".join(summary_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
