"""Random logit test (Sixt, Granz, Landgraf, ICML 2020; Quantus' RandomLogit defaults, METRICS.md §4).

Explain each image again for a class y' drawn uniformly from the other K - 1 classes, and return the
SSIM (`similarity.ssim`, scikit-image's defaults) between the map for the target and the map for y',
each first divided by its max |value| (Quantus' normalise=True). A class-agnostic method gives 1;
lower is better. y' comes from the request's seed alone (the same draw for every image of a batch),
so an image scores the same alone or in a batch; the component "other_class" names it.
"""

from __future__ import annotations

import numpy as np

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.inputs import explain_rows
from saliency_service.core.metrics.map_inputs import check_saliency
from saliency_service.core.metrics.similarity import ssim


def scaled(saliency: np.ndarray) -> np.ndarray:
    """The map divided by its max |value| (an all-zero map stays zero)."""
    peak = float(np.abs(saliency).max())
    return saliency / peak if peak > 0 else saliency


def other_classes(seed: int, targets: np.ndarray, classes: int) -> np.ndarray:
    """One class per target, uniform over the other classes, from one draw of `seed`."""
    draw = np.random.default_rng(seed).integers(0, classes - 1)
    # Skip over the target: draws 0..K-2 map onto the K-1 classes that are not it.
    others: np.ndarray = np.where(draw >= targets, draw + 1, draw).astype(np.int64)
    return others


@METRICS.register("random_logit")
class RandomLogit(ScoreMetric):
    description = (
        "Random logit (Sixt et al. 2020): SSIM between the map for the target and the map for a random other class "
        "(lower is better; a class-agnostic method scores 1)."
    )
    higher_is_better = False
    needs_method = True

    def score(self, request: MetricInput) -> list[MetricValue]:
        check_saliency(request, self.name)
        classes = request.model.config.num_classes
        if classes < 2:
            raise InvalidArgument("TOO_FEW_CLASSES", f"{self.name} needs a model with at least 2 classes", {"metric": self.name})
        x = np.asarray(request.x, dtype=np.float32)
        targets = np.asarray(request.targets, dtype=np.int64)
        others = other_classes(request.seed, targets, classes)
        maps = explain_rows(request, lambda rows: x[rows], others, self.name)
        return [
            MetricValue(value=ssim(scaled(request.saliency[item]), scaled(maps[item])), components={"other_class": float(others[item])})
            for item in range(len(x))
        ]
