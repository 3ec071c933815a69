"""Draw a results CSV: one PNG per shape family, providers side by side.

    python -m bench.plot bench/results/<device>.csv [--out-dir DIR]

For each family (the tutorial's layers, square layers, the MLP training step) a grid of
panels — one row per mode, one column per dtype — with a group of bars per shape and one bar
per provider: TFLOP/s at the median, whiskers from p20 to p80 (log scale when the shapes'
speeds span more than 20x). Uses the newest row of every measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cases import family_of
from .report import MODE_SHORT
from .results import latest_run, read_rows, slug

PROVIDER_ORDER = ("fa_triton_auto", "fa_triton", "fa_triton_interpreter", "reference", "backprop", "compiled")
# One colour per provider in every panel and figure.
PROVIDER_COLORS = {"fa_triton_auto": "C4", "fa_triton": "C0", "fa_triton_interpreter": "C0", "reference": "C1",
                   "backprop": "C2", "compiled": "C3"}
DTYPE_ORDER = ("fp32", "tf32", "bf16", "fp16")
MODE_ORDER = ("forward", "backward", "forward_backward", "train_step")
FAMILY_TITLES = {"tutorial": "tutorial layers (784→128, 128→64, 64→10)", "square": "square layers M=N=K",
                 "mlp": "MLP 784-128-64-10 training step (Adam)"}


def _shape_label(family: str, kernel: str, M: int, N: int, K: int) -> str:
    if family == "mlp":
        return f"batch {M}"
    if family == "square":
        return str(M)
    return f"{K}→{N}\nM={M}"


def plot_rows(rows: list[dict], out_dir: Path | str, prefix: str) -> list[Path]:
    """Write one PNG per family found in `rows`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in latest_run(rows) if r["metric"] == "throughput" and r["p50"] not in ("", None)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    families: dict[str, list[dict]] = {}
    for r in rows:
        family = family_of(r["kernel"], int(r["M"]), int(r["N"]), int(r["K"]))
        if family != "peak":
            families.setdefault(family, []).append(r)

    paths = []
    for family, frows in families.items():
        modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in frows)]
        dtypes = [d for d in DTYPE_ORDER if any(r["dtype"] == d for r in frows)]
        providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in frows)]
        fig, axes = plt.subplots(len(modes), len(dtypes), squeeze=False,
                                 figsize=(max(7.5, 4.8 * len(dtypes)), 1.2 + 3.4 * len(modes)))
        for i, mode in enumerate(modes):
            for j, dtype in enumerate(dtypes):
                ax = axes[i][j]
                panel = [r for r in frows if r["mode"] == mode and r["dtype"] == dtype]
                shapes = sorted({(int(r["M"]), int(r["N"]), int(r["K"]), r["kernel"]) for r in panel},
                                key=lambda s: (s[0], -s[2]))
                width = 0.8 / max(1, len(providers))
                values = []
                for p_index, provider in enumerate(providers):
                    xs, ys, lo, hi = [], [], [], []
                    for s_index, (M, N, K, kernel) in enumerate(shapes):
                        match = [r for r in panel if r["provider"] == provider and int(r["M"]) == M
                                 and int(r["N"]) == N and int(r["K"]) == K and r["kernel"] == kernel]
                        if not match:
                            continue
                        r = match[0]
                        p50 = float(r["p50"])
                        p20 = float(r["p20"]) if r["p20"] else p50
                        p80 = float(r["p80"]) if r["p80"] else p50
                        xs.append(s_index + (p_index - (len(providers) - 1) / 2) * width)
                        ys.append(p50)
                        lo.append(max(p50 - p20, 0))
                        hi.append(max(p80 - p50, 0))
                    if xs:
                        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=provider,
                               color=PROVIDER_COLORS.get(provider))
                        values += ys
                ax.set_xticks(range(len(shapes)))
                ax.set_xticklabels([_shape_label(family, s[3], *s[:3]) for s in shapes], fontsize=8)
                positive = [v for v in values if v > 0]
                if positive and max(positive) / min(positive) > 20:
                    ax.set_yscale("log")
                ax.set_title(f"{MODE_SHORT.get(mode, mode)}, {dtype}", fontsize=10)
                ax.set_ylabel("TFLOP/s")
                ax.grid(axis="y", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for row in axes:
            for ax in row:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in labels:
                        handles.append(h)
                        labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
        devices = sorted({r["device_name"] for r in frows})
        fig.suptitle(f"{FAMILY_TITLES.get(family, family)}\n{', '.join(devices)}", fontsize=11)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = out_dir / f"{prefix}_{family}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_csv(csv_path: Path | str, out_dir: Path | str | None = None, prefix: str | None = None) -> list[Path]:
    csv_path = Path(csv_path)
    rows = read_rows(csv_path)
    if prefix is None:
        devices = sorted({r["device_name"] for r in rows})
        prefix = slug(devices[0]) if len(devices) == 1 else csv_path.stem
    return plot_rows(rows, out_dir if out_dir is not None else csv_path.parent, prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="results CSV written by python -m bench.run")
    parser.add_argument("--out-dir", type=Path, help="where to write the PNGs (default: next to the CSV)")
    parser.add_argument("--prefix", help="file name prefix (default: the device's name)")
    args = parser.parse_args(argv)
    if not args.csv.exists():
        parser.error(f"no such CSV: {args.csv}")
    paths = plot_csv(args.csv, args.out_dir, args.prefix)
    if not paths:
        print(f"{args.csv}: no throughput rows to plot", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
