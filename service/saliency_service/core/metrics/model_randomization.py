"""Model parameter randomisation test (Adebayo et al., NeurIPS 2018; Quantus' MPRT defaults, METRICS.md §4).

Cascading, top-down: the torch program's parameter layers (the modules that own parameters:
convolutions, linears, normalisations) are re-initialised one more at a time, from the output side,
on a copy of the model (`LoadedModel.with_reinitialized`; the served model is never changed), and
the request's method re-explains every image on each copy. Step k compares the map of the model
with its top k layers randomised to the request's map by Spearman rank correlation (of |map| by
default, as Quantus' abs=True). A method that reads the model loses the correlation; one that
ignores the model keeps 1 at every step (a fail). The value is the mean over the steps (lower is
better; Quantus' sanity entry "original" is left out, as the spec advises); the curve holds every
step, `curve_x` the number of layers randomised, and each step is a component named by its layer.
Costs one explanation per step; `layers` caps the steps.
"""

from __future__ import annotations

import numpy as np

from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric, no_progress
from saliency_service.core.metrics.inputs import explain_rows
from saliency_service.core.metrics.map_inputs import check_saliency
from saliency_service.core.metrics.similarity import spearman
from saliency_service.core.params import ParamSpec

MAX_LAYERS = 1000


@METRICS.register("model_randomization")
class ModelRandomization(ScoreMetric):
    description = (
        "Model randomisation (Adebayo et al. 2018): Spearman rank correlation between the map and the maps after cascading "
        "re-initialisation of the model's layers from the top, on a copy; the mean over layers (lower is better)."
    )
    higher_is_better = False
    needs_method = True
    params = (
        ParamSpec(
            "layers",
            "int",
            0,
            "How many parameter layers to randomise, from the output side, one step each (0: all; one explanation per step).",
            minimum=0,
            maximum=MAX_LAYERS,
        ),
        ParamSpec("absolute", "bool", True, "Compare |map| (Quantus, Adebayo's main figure) rather than the signed maps."),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        check_saliency(request, self.name)
        x = np.asarray(request.x, dtype=np.float32)
        batch = len(x)
        order = request.model.parameter_layers()[::-1]
        steps = int(request.params["layers"]) or len(order)
        order = order[:steps]
        absolute = bool(request.params["absolute"])
        targets = np.asarray(request.targets, dtype=np.int64)
        original = request.saliency.reshape(batch, -1).astype(np.float64)
        if absolute:
            original = np.abs(original)
        correlations = np.empty((batch, len(order)))
        for step in range(len(order)):
            randomized = request.model.with_reinitialized(order[: step + 1], request.seed)
            maps = explain_rows(request, lambda rows: x[rows], targets, self.name, model=randomized, progress=no_progress)
            maps = maps.reshape(batch, -1)
            if absolute:
                maps = np.abs(maps)
            correlations[:, step] = [spearman(original[item], maps[item]) for item in range(batch)]
            request.progress("randomised layers", step + 1, len(order))
        x_axis = np.arange(1, len(order) + 1, dtype=np.float64)
        return [
            MetricValue(
                value=float(row.mean()),
                curve=row,
                curve_x=x_axis,
                components={layer: float(value) for layer, value in zip(order, row, strict=True)},
            )
            for row in correlations
        ]
