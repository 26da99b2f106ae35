"""Max-sensitivity (Yeh, Hsieh, Suggala, Inouye, Ravikumar, NeurIPS 2019; Quantus defaults, METRICS.md §4).

Re-explain `samples` noisy copies x + delta of each image for the same target, delta ~ U(-radius,
radius) independently on every value of the normalised input, and return
max_delta ||Phi(x + delta) - Phi(x)||_F / ||Phi(x)||_F, where Phi(x) is the request's map. The
maximum is taken over the numerators and divided once (the original code's running division is a
bug the spec warns of). An explanation that does not depend on x (the gradient of a linear model)
scores 0. The noise comes from the request's seed alone, the same for every image of a batch. A map
that is zero everywhere gives 0 when every re-explanation is zero too, infinity otherwise.
"""

from __future__ import annotations

import numpy as np

from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.inputs import explain_rows
from saliency_service.core.metrics.map_inputs import check_saliency
from saliency_service.core.params import ParamSpec

MAX_SAMPLES = 2000


def relative_change(change: float, reference: float) -> float:
    """change / reference, with 0 / 0 = 0 and c / 0 = infinity."""
    if reference > 0:
        return change / reference
    return 0.0 if change == 0 else float("inf")


@METRICS.register("max_sensitivity")
class MaxSensitivity(ScoreMetric):
    description = (
        "Max-sensitivity (Yeh et al. 2019): the largest relative change ||map(x + d) - map(x)|| / ||map(x)|| over random "
        "input perturbations d ~ U(-radius, radius) (lower is better)."
    )
    higher_is_better = False
    needs_method = True
    params = (
        ParamSpec("samples", "int", 200, "Perturbed copies of each image to re-explain (Quantus: 200).", minimum=1, maximum=MAX_SAMPLES),
        ParamSpec(
            "radius",
            "float",
            0.2,
            "Half-width of the uniform noise added to every value of the normalised input (Quantus: 0.2).",
            minimum=0.0,
            maximum=10.0,
        ),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        check_saliency(request, self.name)
        x = np.asarray(request.x, dtype=np.float32)
        batch = len(x)
        samples, radius = int(request.params["samples"]), float(request.params["radius"])
        rng = np.random.default_rng(request.seed)
        noise = rng.uniform(-radius, radius, (samples, *x.shape[1:])).astype(np.float32)
        targets = np.repeat(np.asarray(request.targets, dtype=np.int64), samples)

        def make(rows: np.ndarray) -> np.ndarray:
            images: np.ndarray = x[rows // samples] + noise[rows % samples]
            return images

        maps = explain_rows(request, make, targets, self.name).reshape(batch, samples, -1)
        original = request.saliency.reshape(batch, -1).astype(np.float64)
        changes = np.linalg.norm(maps - original[:, None, :], axis=2).max(axis=1)
        norms = np.linalg.norm(original, axis=1)
        return [MetricValue(value=relative_change(float(c), float(n))) for c, n in zip(changes, norms, strict=True)]
