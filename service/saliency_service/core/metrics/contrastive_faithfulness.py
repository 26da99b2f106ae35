"""Contrastive faithfulness: RFxG's class-contrast score CCS (Elisha et al., arXiv 2511.13081; METRICS.md §7).

The map answers "why the target a, not the foil b" (a contrastive method's map for the request's
foil, or a caller's map sent with a foil). For alpha = 0.1, 0.2, ..., 0.9 the top floor(alpha * H * W)
pixels of the map (`pixel_ranks`: descending, ties by pixel index) are set to the substrate, and
g(alpha) = p_a - p_b is read from the softmax of the masked image. Removing the contrastive evidence
should collapse the preference for a over b, so lower is better. The value is the trapezoid area
under g over alpha divided by the 0.8 span (the mean contrast); the paper's unnormalised area is the
component "area", and the untouched image's p_a - p_b is "clean". A model that ignores its input
gives value = clean.

The group-granularity scores (PGS, CGC, CGS) are in `rfxg_groups`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from saliency_service.core.images import gaussian_blur
from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.deletion_insertion import SUBSTRATES, pixel_ranks, target_scores
from saliency_service.core.metrics.inputs import require_foils, score_images
from saliency_service.core.metrics.map_inputs import check_saliency
from saliency_service.core.params import ParamSpec

ALPHAS = np.round(np.arange(1, 10) / 10, 1)


def top_removed(request: MetricInput, substrate_kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """make(rows) -> the masked images of RFxG's curve: row r is item r // 9 with its top floor(alpha * H * W)
    pixels (alpha = ALPHAS[r % 9]) set to the substrate ("zero", or "blur": the 11x11 sigma=5 blur)."""
    x = np.ascontiguousarray(request.x, dtype=np.float32)
    batch, channels, height, width = x.shape
    pixels = height * width
    substrate = gaussian_blur(torch.from_numpy(x)).numpy() if substrate_kind == "blur" else np.zeros_like(x)
    ranks = pixel_ranks(request.saliency)
    counts = np.floor(ALPHAS * pixels).astype(np.int64)
    points = len(ALPHAS)
    flat, substrate_flat = x.reshape(batch, channels, pixels), substrate.reshape(batch, channels, pixels)

    def make(rows: np.ndarray) -> np.ndarray:
        item, point = rows // points, rows % points
        removed = ranks[item] < counts[point][:, None]
        images: np.ndarray = np.where(removed[:, None, :], substrate_flat[item], flat[item]).reshape(len(rows), channels, height, width)
        return images

    return make


@METRICS.register("contrastive_faithfulness")
class ContrastiveFaithfulness(ScoreMetric):
    description = (
        "Contrastive faithfulness (RFxG's CCS, Elisha et al.): p(target) - p(foil) as the top 10%..90% of a contrastive map "
        "are removed, averaged over the removed share (lower is better); needs a foil."
    )
    higher_is_better = False
    needs_foil = True
    params = (
        ParamSpec(
            "substrate",
            "string",
            "zero",
            "What removed pixels become: zero in normalised space (the dataset mean; RFxG's default mask value 0) or the "
            "11x11 sigma=5 Gaussian blur of the image.",
            choices=SUBSTRATES,
        ),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        check_saliency(request, self.name)
        foils = require_foils(request, self.name)
        x = np.ascontiguousarray(request.x, dtype=np.float32)
        batch = len(x)
        targets = np.asarray(request.targets, dtype=np.int64)
        points = len(ALPHAS)
        make = top_removed(request, str(request.params["substrate"]))
        rows = batch * points
        contrasts = score_images(request, rows, make, np.repeat(targets, points), "probability", foils=np.repeat(foils, points))
        curves = contrasts.reshape(batch, points)
        logits = request.model.logits(x)
        clean = target_scores(logits, targets, "probability") - target_scores(logits, foils, "probability")
        values = []
        for item in range(batch):
            area = float(np.trapezoid(curves[item], ALPHAS))
            span = float(ALPHAS[-1] - ALPHAS[0])
            values.append(
                MetricValue(
                    value=area / span, curve=curves[item], curve_x=ALPHAS.copy(), components={"area": area, "clean": float(clean[item])}
                )
            )
        return values
