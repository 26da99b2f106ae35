"""Class sensitivity (Rebuffi, Fong, Ji, Vedaldi, "There and Back Again", CVPR 2020; METRICS.md §6).

For each image, explain the highest and the lowest scoring class (by the model's logits on the image)
and return the Pearson correlation r of the two maps over pixels: a method that ignores the class
gives r = 1, so lower is better. The MindSpore port reports (1 - r) / 2 in [0, 1], higher is better;
it is the component "mindspore". The request's own map and target are not used: the classes are the
extremes of the prediction, whatever target the request named.
"""

from __future__ import annotations

import numpy as np

from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.inputs import explain_rows
from saliency_service.core.metrics.map_inputs import check_saliency
from saliency_service.core.metrics.similarity import pearson


@METRICS.register("class_sensitivity")
class ClassSensitivity(ScoreMetric):
    description = (
        "Class sensitivity (Rebuffi et al. 2020): Pearson correlation between the maps of the most and the least likely "
        "class (lower is better; a class-agnostic method scores 1)."
    )
    higher_is_better = False
    needs_method = True

    def score(self, request: MetricInput) -> list[MetricValue]:
        check_saliency(request, self.name)
        x = np.asarray(request.x, dtype=np.float32)
        logits = request.model.logits(x)
        # Item-major pairs: row 2i explains image i's top class, row 2i + 1 its bottom class.
        classes = np.stack([logits.argmax(axis=1), logits.argmin(axis=1)], axis=1).reshape(-1).astype(np.int64)
        maps = explain_rows(request, lambda rows: x[rows // 2], classes, self.name).reshape(len(x), 2, -1)
        values = []
        for item in range(len(x)):
            r = pearson(maps[item, 0], maps[item, 1])
            top, bottom = float(classes[2 * item]), float(classes[2 * item + 1])
            values.append(MetricValue(value=r, components={"mindspore": (1 - r) / 2, "top_class": top, "bottom_class": bottom}))
        return values
