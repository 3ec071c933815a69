"""The short summary of a benchmark run: the issue's targets, then a table of fa_triton against the reference.

    python -m bench.report bench/results/<device>.csv

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
        return (kernel.startswith("mlp"), M == N == K, M, -K, dtype, mode_order.index(mode) if mode in mode_order else 9)

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
    """The issue's GPU targets, each with what this run measured (or that it did not)."""
    rows = latest_run(rows)
    index = _index(rows)
    device = rows[0]["device_name"] if rows else "?"

    def get(kernel, mode, dtype, M, N, K, metric, provider="fa_triton"):
        return _value(index.get((kernel, provider, mode, dtype, M, N, K, metric)))

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "NOT met")

    lines = [f"targets ({device}):"]
    ratio = get("fa_linear_relu", "forward_backward", "bf16", 8192, 8192, 8192, "speedup_vs_reference")
    pct = get("fa_linear_relu", "forward_backward", "bf16", 8192, 8192, 8192, "pct_mm_peak")
    ok = None if ratio is None or pct is None else (ratio >= 1.0 and pct >= 70.0)
    detail = "" if ok is None else f": {ratio:.2f}x reference, {pct:.1f}% of the measured bf16 mm rate"
    lines.append(f"  8192^3 bf16 fwd+bwd >= 1.0x reference and >= 70% of mm peak: {verdict(ok)}{detail}")
    from .cases import TUTORIAL_LAYERS

    for dtype in ("fp32", "tf32", "bf16", "fp16"):
        ratios = [get(f"fa_linear_{act}", "forward_backward", dtype, 8192, n, k, "speedup_vs_reference")
                  for k, n, act in TUTORIAL_LAYERS]
        if all(r is None for r in ratios):
            continue
        ok = None if any(r is None for r in ratios) else all(r >= 1.3 for r in ratios)
        shown = ", ".join("-" if r is None else f"{r:.2f}x" for r in ratios)
        lines.append(f"  tutorial layers at batch 8192, {dtype} fwd+bwd >= 1.3x reference: {verdict(ok)} ({shown})")
    for dtype in ("fp32", "tf32", "bf16", "fp16"):
        ratio = get("mlp_784-128-64-10", "train_step", dtype, 64, 10, 784, "speedup_vs_reference")
        if ratio is not None:
            lines.append(f"  MLP train step at batch 64, {dtype} >= 1.5x reference: {verdict(ratio >= 1.5)} "
                         f"({ratio:.2f}x)")
    if len(lines) == 2 and "not measured" in lines[1]:
        lines.append("  (tutorial layers at 8192 and the MLP step at batch 64: not measured)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="results CSV written by python -m bench.run")
    parser.add_argument("--since", help="only rows with a timestamp at or after this one (UTC, ISO 8601)")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    if args.since:
        rows = [r for r in rows if r["timestamp"] >= args.since]
    print("\n".join(target_lines(rows)))
    print()
    print("\n".join(summary_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
