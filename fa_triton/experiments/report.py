"""What a run prints and draws: the per-epoch table, the summary over seeds, ``training.png``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas

IDENTITY = ("method", "model", "dataset", "seed")
"""The columns that name a run's rows rather than measure them."""


def metric_columns(df: "pandas.DataFrame") -> list[str]:
    """The measured columns, in the table's order (losses, accuracies, seconds, angles)."""
    return [c for c in df.columns if c not in IDENTITY and c not in ("epoch", "lr")]


PRINTED_LAYERS = 5
"""Deeper models print no per-layer angles (they are in metrics.csv and summary.csv)."""


def _layer_columns(columns) -> list[str]:
    return [c for c in columns if c.startswith(("angle_", "grad_angle_"))]


def _too_many_layers(columns) -> bool:
    return sum(c.startswith("angle_") or c.startswith("grad_angle_") for c in columns) > 2 * PRINTED_LAYERS


def format_table(df: "pandas.DataFrame", digits: int = 3) -> str:
    """The per-epoch table as the tutorial prints it: indexed by epoch, numbers rounded to ``digits``.
    Several seeds: the mean over seeds of each epoch. Models of more than ``PRINTED_LAYERS``
    layers: without the per-layer angles."""
    drop = [c for c in IDENTITY if c in df.columns]
    if _too_many_layers(df.columns):
        drop += _layer_columns(df.columns)
    if "lr" in df.columns and df["lr"].nunique() == 1:  # a constant learning rate says nothing per epoch
        drop.append("lr")
    table = df.drop(columns=drop)
    if "seed" in df.columns and df["seed"].nunique() > 1:
        table = table.groupby("epoch", as_index=False).mean(numeric_only=True)
    return table.set_index("epoch").to_string(float_format=lambda value: f"{value:.{digits}f}")


def _std(values) -> float:
    """The sample standard deviation (ddof=1); 0 for one value."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(df: "pandas.DataFrame") -> "pandas.DataFrame":
    """Mean and std over seeds of each metric at the last epoch, and, where the run holds out a
    validation set, the test metrics of each seed's best-validation epoch (``*_at_best_val``).

    One row per metric: ``metric, mean, std, seeds``; std is the sample standard deviation over seeds
    (ddof=1, as papers report it), 0 with one seed.
    """
    import pandas as pd

    rows = []
    last = df[df["epoch"] == df.groupby("seed")["epoch"].transform("max")] if "seed" in df.columns else df.tail(1)
    for column in metric_columns(df):
        if column == "seconds":
            continue
        values = last[column].astype(float)
        rows.append({"metric": column, "mean": values.mean(), "std": _std(values), "seeds": len(values)})
    if "acc_val" in df.columns and "seed" in df.columns:
        best = df.loc[df.groupby("seed")["acc_val"].idxmax()]
        for column in ("acc_test", "loss_test", "epoch"):
            values = best[column].astype(float)
            rows.append({"metric": f"{column}_at_best_val", "mean": values.mean(), "std": _std(values),
                         "seeds": len(values)})
    if "seconds" in df.columns:
        per_seed = df.groupby("seed")["seconds"].sum() if "seed" in df.columns else df["seconds"].sum()
        values = per_seed.astype(float) if hasattr(per_seed, "astype") else pd.Series([per_seed])
        rows.append({"metric": "seconds_total", "mean": values.mean(), "std": _std(values),
                     "seeds": len(values)})
    return pd.DataFrame(rows, columns=["metric", "mean", "std", "seeds"])


def format_summary(summary: "pandas.DataFrame", digits: int = 3) -> str:
    """``metric  mean ± std`` lines (``± std`` left out with one seed)."""
    lines = []
    if _too_many_layers(summary["metric"]):
        summary = summary[~summary["metric"].isin(_layer_columns(summary["metric"]))]
    width = max(len(m) for m in summary["metric"]) if len(summary) else 0
    for row in summary.itertuples():
        spread = f" ± {row.std:.{digits}f}" if row.seeds > 1 else ""
        lines.append(f"  {row.metric:<{width}}  {row.mean:.{digits}f}{spread}")
    seeds = int(summary["seeds"].max()) if len(summary) else 0
    head = f"at the last epoch, mean ± std over {seeds} seeds:" if seeds > 1 else "at the last epoch:"
    return "\n".join([head, *lines])


def _by_epoch(frame):
    """(mean, std) over seeds of every numeric column, per epoch (std: ddof=1; 0 with one seed)."""
    grouped = frame.groupby("epoch")
    mean = grouped.mean(numeric_only=True)
    std = grouped.std(ddof=1, numeric_only=True).fillna(0.0) if len(frame) > len(mean) else mean * 0.0
    return mean, std


def plot_training(df: "pandas.DataFrame", path) -> None:
    """Write loss, accuracy and angles per epoch (three panels; a mean ± std band over seeds) to ``path`` (PNG).

    The angle panel shows the W-B angles (``angle_i``, solid) and the gradient alignment with
    backprop (``grad_angle_i``, dashed) where the run has them."""
    # A bare Figure rather than pyplot: no display needed, and the caller's backend is left alone.
    from matplotlib.figure import Figure

    mean, std = _by_epoch(df)
    epochs = mean.index.to_numpy()

    def curve(ax, column, style, label):
        line, = ax.plot(epochs, mean[column], style, label=label, markersize=4)
        if (std[column] > 0).any():
            ax.fill_between(epochs, mean[column] - std[column], mean[column] + std[column], alpha=0.2,
                            color=line.get_color())

    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 3.8))
    ax_loss, ax_acc, ax_angle = fig.subplots(1, 3)
    for split, style in (("train", "-o"), ("val", ":^"), ("test", "--s")):
        if f"loss_{split}" in mean.columns:
            curve(ax_loss, f"loss_{split}", style, split)
            curve(ax_acc, f"acc_{split}", style, split)
    angles = [c for c in mean.columns if c.startswith("angle_")]
    grad_angles = [c for c in mean.columns if c.startswith("grad_angle_")]
    if _too_many_layers(mean.columns):  # a deep model: the mean over its layers (the output layer's 0 left out)
        per_run = df.assign(angle_mean=df[angles].mean(axis=1) if angles else 0.0,
                            grad_angle_mean=df[grad_angles[:-1]].mean(axis=1) if grad_angles else 0.0)
        mean, std = _by_epoch(per_run)
        if angles:
            curve(ax_angle, "angle_mean", "-o", f"W-B, mean of {len(angles)} layers")
        if grad_angles:
            curve(ax_angle, "grad_angle_mean", "--x", f"grad vs BP, mean of {len(grad_angles) - 1} hidden layers")
    else:
        for column in angles:
            curve(ax_angle, column, "-o", f"W-B, layer {column.split('_')[1]}")
        for column in grad_angles:
            curve(ax_angle, column, "--x", f"grad vs BP, layer {column.split('_')[2]}")
    ax_angle.axhline(90, color="grey", linewidth=0.8, linestyle=":")
    seeds = df["seed"].nunique() if "seed" in df.columns else 1
    band = f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""
    for ax, title in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy"), (ax_angle, "angle [degrees]")):
        ax.set_title(title + band)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
