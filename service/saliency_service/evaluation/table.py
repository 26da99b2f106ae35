"""The evaluation table: per-(method, metric) means with a seeded bootstrap CI, written as CSV, markdown and a plot.

Pure numpy (and matplotlib for the plot): the in-process and the gRPC evaluations both end here.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("method", "metric", "mean", "ci_low", "ci_high", "n")
RESAMPLES = 2000
CI_NOTE = (
    f"95% CI: bootstrap percentile interval ({RESAMPLES} resamples of the per-image values, seeded); "
    "n counts the images with a finite value."
)


@dataclass(frozen=True)
class Row:
    method: str
    metric: str
    mean: float
    ci_low: float
    ci_high: float
    n: int


@dataclass(frozen=True)
class Skipped:
    method: str
    metric: str
    reason: str


def summarise(method: str, metric: str, values: Sequence[float], seed: int) -> Row:
    """Mean of the finite per-image values and its 95% bootstrap percentile interval (NaN when none is finite)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if len(finite) == 0:
        return Row(method, metric, float("nan"), float("nan"), float("nan"), 0)
    # One generator per cell, keyed by the names, so adding a method does not move another's interval.
    key = [seed, *(ord(c) for c in f"{method}\0{metric}")]
    draws = np.random.default_rng(key).integers(0, len(finite), size=(RESAMPLES, len(finite)))
    means = finite[draws].mean(axis=1)
    mean = float(finite.mean())
    low, high = np.percentile(means, [2.5, 97.5])
    # A percentile interval of a skewed sample can exclude the sample mean by rounding; keep low <= mean <= high.
    return Row(method, metric, mean, min(float(low), mean), max(float(high), mean), len(finite))


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([row.method, row.metric, f"{row.mean:.6g}", f"{row.ci_low:.6g}", f"{row.ci_high:.6g}", row.n])


def _arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


def _pivot(rows: Sequence[Row]) -> tuple[list[str], list[str], np.ndarray]:
    methods = sorted({row.method for row in rows})
    metrics = sorted({row.metric for row in rows})
    grid = np.full((len(methods), len(metrics)), np.nan)
    for row in rows:
        grid[methods.index(row.method), metrics.index(row.metric)] = row.mean
    return methods, metrics, grid


def markdown(rows: Sequence[Row], higher_is_better: Mapping[str, bool], skipped: Sequence[Skipped], settings: Mapping[str, str]) -> str:
    """The pivot (methods x metrics, means, an arrow per metric), the long table with CIs, the skipped list and the settings."""
    methods, metrics, grid = _pivot(rows)
    lines = ["## Mean per method and metric", ""]
    lines.append("| method | " + " | ".join(f"{m} {_arrow(higher_is_better[m])}" for m in metrics) + " |")
    lines.append("|---|" + "---:|" * len(metrics))
    for i, method in enumerate(methods):
        cells = ["–" if np.isnan(v) else f"{v:.3f}" for v in grid[i]]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "↑ higher is better, ↓ lower is better; – not run (see Skipped).", "", "## All values", "", CI_NOTE, ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for row in rows:
        lines.append(f"| {row.method} | {row.metric} | {row.mean:.4f} | {row.ci_low:.4f} | {row.ci_high:.4f} | {row.n} |")
    if skipped:
        lines += ["", "## Skipped", "", "| method | metric | reason |", "|---|---|---|"]
        lines += [f"| {s.method} | {s.metric} | {s.reason.replace('|', '/')} |" for s in skipped]
    lines += ["", "## Settings", ""]
    lines += [f"- {name}: {value}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def rank_matrix(grid: np.ndarray, higher_is_better: Sequence[bool]) -> np.ndarray:
    """Per column, each method's rank scaled to [0, 1] (1 = best); NaN where there is no value."""
    ranks = np.full(grid.shape, np.nan)
    for j, higher in enumerate(higher_is_better):
        present = np.flatnonzero(~np.isnan(grid[:, j]))
        if len(present) == 0:
            continue
        order = np.argsort(grid[present, j] * (1 if higher else -1), kind="stable")
        ranks[present[order], j] = np.arange(len(present)) / max(1, len(present) - 1)
    return ranks


def write_plot(path: Path, rows: Sequence[Row], higher_is_better: Mapping[str, bool], title: str) -> None:
    """A heatmap of the pivot: colour is the rank within each metric (green best), text the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, metrics, grid = _pivot(rows)
    ranks = rank_matrix(grid, [higher_is_better[m] for m in metrics])
    figure, axes = plt.subplots(figsize=(3.0 + 1.1 * len(metrics), 2.2 + 0.35 * len(methods)))
    axes.imshow(np.ma.masked_invalid(ranks), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axes.set_xticks(range(len(metrics)), [f"{m} {_arrow(higher_is_better[m])}" for m in metrics], rotation=30, ha="right")
    axes.set_yticks(range(len(methods)), methods)
    for i in range(len(methods)):
        for j in range(len(metrics)):
            if not np.isnan(grid[i, j]):
                axes.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
