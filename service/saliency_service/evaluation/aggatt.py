"""AggAtt (Rao, Böhle, Schiele, CVPR 2022; METRICS.md §5): a method's maps averaged within percentile bins of a metric.

Part of `evaluate`, not a Score metric: it summarises a set of images, while Score returns one value per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRACTIONS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.5, 0.95, 0.98, 1.0)
"""The paper's bin edges over the maps sorted best first: 6 bins (2%, 3%, 45%, 45%, 3%, 2%)."""
SCALE_PERCENTILE = 99.5


@dataclass(frozen=True)
class AggAttBin:
    low: float
    high: float
    count: int
    mean_map: np.ndarray
    """H x W float32: the pixel-wise mean of the positive parts of the bin's maps (zeros for an empty bin)."""


def aggatt_bins(maps: np.ndarray, scores: np.ndarray, fractions: Sequence[float] = FRACTIONS) -> list[AggAttBin]:
    """Sort the N maps by score (descending; ties by positive mass, then index), cut at `fractions`, average each bin.

    Edges are round(fraction * N), so every map falls in exactly one bin; with small N some bins are empty.
    """
    if len(maps) != len(scores) or maps.ndim != 3:
        raise ValueError(f"need N x H x W maps and N scores, got {maps.shape} and {scores.shape}")
    positive = np.maximum(maps.astype(np.float64), 0.0)
    mass = positive.reshape(len(maps), -1).sum(axis=1)
    order = np.lexsort((np.arange(len(maps)), -mass, -np.nan_to_num(scores, nan=-np.inf)))
    edges = np.round(np.asarray(fractions) * len(maps)).astype(int)
    bins = []
    for low, high, start, stop in zip(fractions[:-1], fractions[1:], edges[:-1], edges[1:], strict=True):
        members = order[start:stop]
        mean = positive[members].mean(axis=0) if len(members) else np.zeros(maps.shape[1:])
        bins.append(AggAttBin(float(low), float(high), len(members), mean.astype(np.float32)))
    return bins


def write_aggatt(path: Path, bins: Sequence[AggAttBin], title: str) -> None:
    """One PNG: the bins side by side on one colour scale (the 99.5th percentile of all bin maps together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = float(np.percentile(np.stack([b.mean_map for b in bins]), SCALE_PERCENTILE)) or 1.0
    figure, axes = plt.subplots(1, len(bins), figsize=(2.0 * len(bins), 2.4))
    for axis, item in zip(np.atleast_1d(axes), bins, strict=True):
        axis.imshow(item.mean_map, cmap="inferno", vmin=0.0, vmax=scale)
        axis.set_title(f"{item.low:.0%}-{item.high:.0%} (n={item.count})", fontsize=8)
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
