"""The short summary of a benchmark run: the issue's targets, then a table of fa_triton against the reference.

    python -m bench.report bench/results/<device>.csv [--sweep bench/results/sweep-<device>.csv]

reads the newest row of every measurement in the CSV and prints::

    shape | dtype | mode | fa_triton ms | reference ms | ratio | % of peak

``ratio`` is reference time / fa_triton time (above 1: fa_triton is faster); ``% of peak`` is
fa_triton's share of the roofline built from the ceilings measured in the same run (the
``torch.mm`` rate in that dtype when compute-bound, the device copy rate when memory-bound).
"""

from __future__ import annotations

import argparse
import sys

from .results import latest_run, read_rows

MODE_SHORT = {"forward": "fwd", "backward": "bwd", "forward_backward": "fwd+bwd", "train_step": "train step"}
FA_PROVIDERS = ("fa_triton", "fa_triton_interpreter")


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


def summary_lines(rows: list[dict]) -> list[str]:
    """Lines of the summary table for every case timed with both fa_triton and the reference."""
    rows = latest_run(rows)
    index = _index(rows)
    cases = []
    for r in rows:
        if r["provider"] in FA_PROVIDERS and r["metric"] == "time":
            cases.append((r["kernel"], r["provider"], r["mode"], r["dtype"], int(r["M"]), int(r["N"]), int(r["K"])))
    table = []
    mode_order = list(MODE_SHORT)

    def order(c):
        kernel, provider, mode, dtype, M, N, K = c
        mode_rank = mode_order.index(mode) if mode in mode_order else 9
        return (kernel.startswith("mlp"), M == N == K, M, -K, dtype, mode_rank)

    for kernel, provider, mode, dtype, M, N, K in sorted(set(cases), key=order):
        fa_ms = _value(index.get((kernel, provider, mode, dtype, M, N, K, "time")))
        ref_ms = _value(index.get((kernel, "reference", mode, dtype, M, N, K, "time")))
        if fa_ms is None or ref_ms is None:
            continue
        peak = _value(index.get((kernel, provider, mode, dtype, M, N, K, "pct_roofline")))
        name = _shape(kernel, M, N, K) + (" [interpreter]" if provider == "fa_triton_interpreter" else "")
        table.append((name, dtype, MODE_SHORT.get(mode, mode), f"{fa_ms:.4g}", f"{ref_ms:.4g}",
                      f"{ref_ms / fa_ms:.2f}x", "-" if peak is None else f"{peak:.1f}%"))
    if not table:
        return ["(no case was timed with both fa_triton and reference)"]
    header = ("shape", "dtype", "mode", "fa_triton ms", "reference ms", "ratio", "% of peak")
    widths = [max(len(str(line[i])) for line in [header, *table]) for i in range(len(header))]

    def fmt(line):
        return " | ".join(str(cell).ljust(width) if i < 3 else str(cell).rjust(width)
                          for i, (cell, width) in enumerate(zip(line, widths)))

    return [fmt(header), "-+-".join("-" * w for w in widths), *(fmt(line) for line in table)]


def target_lines(rows: list[dict]) -> list[str]:
    """The layer-level GPU targets (fwd+bwd against the reference), each with what this run
    measured (or that it did not)."""
    rows = latest_run(rows)
    index = _index(rows)
    device = rows[0]["device_name"] if rows else "?"

    def get(kernel, mode, dtype, M, N, K, metric, provider="fa_triton"):
        return _value(index.get((kernel, provider, mode, dtype, M, N, K, metric)))

    lines = [f"targets ({device}):"]
    for dtype, goal in (("bf16", 1.0), ("fp16", 1.0), ("tf32", 1.0), ("fp32", None)):
        ratios = {n: get("fa_linear_relu", "forward_backward", dtype, n, n, n, "speedup_vs_reference")
                  for n in (4096, 8192)}
        shown = ", ".join(f"{n}^3 " + ("not measured" if r is None else f"{r:.2f}x") for n, r in ratios.items())
        if goal is None:
            lines.append(f"  {dtype} (IEEE) fwd+bwd vs reference (reported, no target): {shown}")
            continue
        measured = [r for r in ratios.values() if r is not None]
        verdict = "not measured" if not measured else ("met" if all(r >= goal for r in measured) else "NOT met")
        if measured and len(measured) < len(ratios):
            verdict += " (partly measured)"
        lines.append(f"  {dtype} fwd+bwd >= {goal:.1f}x reference (goal 1.05x): {verdict}: {shown}")
    return lines


# Per-kernel targets of the chosen configs in a bench/sweep.py CSV: GPU time / cuBLAS GEMM time.
KERNEL_TARGETS = (("square", ("bf16", "fp16"), 1.05), ("tutorial", ("fp32", "tf32", "bf16", "fp16"), 1.2))


def kernel_target_lines(sweep_rows: list[dict]) -> list[str]:
    """Each kernel's GPU time as a multiple of the cuBLAS GEMM of the same shape and layout, for
    the configs fa_triton picks (``chosen`` rows of ``python -m bench.sweep``), newest first."""
    chosen = {}
    for row in sweep_rows:
        if row.get("chosen") == "True" and row.get("status") == "ok":
            chosen[(row["target"], row["dtype"], int(row["M"]), int(row["K"]), int(row["N"]), row["job"])] = row
    if not chosen:
        return ["per-kernel targets: not measured (no chosen rows of bench.sweep)"]
    device = next(iter(chosen.values()))["gpu"]
    lines = [f"per-kernel targets ({device}; GPU time / cuBLAS GEMM time):"]
    for target, dtypes, limit in KERNEL_TARGETS:
        for dtype in dtypes:
            cases = {k: r for k, r in chosen.items() if k[0] == target and k[1] == dtype}
            if not cases:
                continue
            ratios = [float(r["ratio_vs_cublas"]) for r in cases.values()]
            worst = max(cases.values(), key=lambda r: float(r["ratio_vs_cublas"]))
            verdict = "met" if max(ratios) <= limit else "NOT met"
            lines.append(f"  {target} {dtype}: each kernel <= {limit}x cuBLAS: {verdict} ({len(ratios)} kernels; "
                         f"worst {float(worst['ratio_vs_cublas']):.2f}x: {worst['job']} "
                         f"{worst['M']}x{worst['K']}->{worst['N']})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="results CSV written by python -m bench.run")
    parser.add_argument("--since", help="only rows with a timestamp at or after this one (UTC, ISO 8601)")
    parser.add_argument("--sweep", help="a bench.sweep CSV: per-kernel targets of the configs fa_triton picks")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    if args.since:
        rows = [r for r in rows if r["timestamp"] >= args.since]
    print("\n".join(target_lines(rows)))
    if args.sweep:
        import csv

        with open(args.sweep, newline="") as f:
            print("\n".join(kernel_target_lines(list(csv.DictReader(f)))))
    print()
    print("\n".join(summary_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
