"""Complexity of a map (METRICS.md §4): sparseness (Gini index; Chalasani et al. 2020) and complexity
(entropy; Bhatt et al. 2020). Both read the map alone: no forward passes, no masks.
"""

from __future__ import annotations

import math

import numpy as np

from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.map_inputs import attribution_param, attribution_view, checked_maps

GINI_OFFSET = 1e-7
"""Added to every value of the max-normalised map before the Gini index (Quantus), so an all-zero map is uniform."""
ENTROPY_OFFSET = 1e-12
"""Inside the logarithm of the entropy (Quantus), so zero shares add nothing."""


def gini_index(values: np.ndarray) -> float:
    """Gini index of non-negative values: 0 when all are equal, (n-1)/n for one non-zero value among n.

    The values are divided by their maximum, then GINI_OFFSET is added (Quantus' order: the offset is
    small against the largest value whatever the map's scale), then with a_(k) sorted ascending,
    G = sum_k (2k - n - 1) a_(k) / (n sum_k a_(k)).
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    peak = flat.max()
    if peak > 0:
        flat = flat / peak
    ordered = np.sort(flat + GINI_OFFSET)
    n = len(ordered)
    weights = 2 * np.arange(1, n + 1) - n - 1
    return float((weights * ordered).sum() / (n * ordered.sum()))


def entropy(values: np.ndarray) -> float:
    """Shannon entropy (nats) of non-negative values as shares of their sum: ln n when all are equal, 0 for one.

    An all-zero map carries no preference, so it counts as uniform (ln n) instead of 0/0.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    total = flat.sum()
    if total <= 0:
        return math.log(len(flat))
    shares = flat / total
    return float(-(shares * np.log(shares + ENTROPY_OFFSET)).sum())


@METRICS.register("sparseness")
class Sparseness(ScoreMetric):
    """Sparseness (Chalasani et al. 2020; Quantus `Sparseness`): the Gini index of the map's absolute value.

    Quantus normalises by the maximum before its offset; `gini_index` does the same, so the value does
    not depend on the map's scale. 1 - 1/n for a one-hot map, 0 for a constant one.
    """

    description = "Sparseness: the Gini index of |map| (Chalasani et al.); 0 for a constant map, (n-1)/n for one pixel (higher is better)."
    higher_is_better = True
    params = (attribution_param("absolute", "absolute", "positive"),)

    def score(self, request: MetricInput) -> list[MetricValue]:
        maps = attribution_view(checked_maps(request, self.name), str(request.params["attribution"]))
        return [MetricValue(value=gini_index(view)) for view in maps]


@METRICS.register("complexity")
class Complexity(ScoreMetric):
    """Complexity (Bhatt et al. 2020; Quantus `Complexity`): the entropy of |map| / sum |map|, in nats.

    ln n for a uniform map (n pixels), 0 for a one-hot map; an all-zero map counts as uniform. The
    component `normalised` is the value over ln n, in [0, 1], comparable across image sizes.
    """

    description = (
        "Complexity: the entropy (nats) of |map| as shares of its sum (Bhatt et al.); 0 for one pixel, "
        "ln n for a uniform map (lower is better)."
    )
    higher_is_better = False
    params = (attribution_param("absolute", "absolute", "positive"),)

    def score(self, request: MetricInput) -> list[MetricValue]:
        maps = attribution_view(checked_maps(request, self.name), str(request.params["attribution"]))
        values = []
        for view in maps:
            value = entropy(view)
            values.append(MetricValue(value=value, components={"normalised": value / math.log(view.size) if view.size > 1 else 0.0}))
        return values
