"""Localisation against a ground-truth mask S (METRICS.md §3): pointing game, energy-based pointing game,
relevance mass accuracy and relevance rank accuracy. They read the map and the mask only (0 forward passes)
and give one value per image; aggregating over a data set (e.g. the pointing game's per-class accuracy)
is the caller's job.

Ties are scored by their expected value under a uniformly random tie-break. That is deterministic, equals
a plain arg-max or top-K when nothing is tied, and does not reward a map for where ties fall in raster
order: a constant map scores exactly the chance level, like a random one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.map_inputs import attribution_param, attribution_view, checked_maps, checked_masks
from saliency_service.core.params import ParamSpec

MAX_TOLERANCE_PX = 4096
REGIONS = ("box", "mask")


def pointing_hits(view: np.ndarray, mask: np.ndarray, tolerance_px: float) -> tuple[float, float, int]:
    """(hit, distance_px, tied): the share of the map's maxima that lie within `tolerance_px` of the mask,
    their mean Euclidean distance to the nearest mask pixel (0 inside), and how many pixels tie for the maximum."""
    distance = ndimage.distance_transform_edt(~mask)
    peaks = distance[view == view.max()]
    return float((peaks <= tolerance_px).mean()), float(peaks.mean()), int(peaks.size)


def mass_share(view: np.ndarray, region: np.ndarray) -> float:
    """The share of a non-negative map's mass inside `region`; 0 when the map has no mass (it points nowhere)."""
    total = view.sum()
    return float(view[region].sum() / total) if total > 0 else 0.0


def top_k_share(view: np.ndarray, mask: np.ndarray) -> float:
    """|top-K(view) ∩ mask| / K with K = |mask|; values tied at the K-th largest share the remaining slots
    in proportion to how many of them lie in the mask (the expected value of a random tie-break)."""
    flat, inside = view.ravel(), mask.ravel()
    k = int(inside.sum())
    kth = np.partition(flat, flat.size - k)[flat.size - k]
    above, tied = flat > kth, flat == kth
    slots = k - int(above.sum())
    return float((np.count_nonzero(above & inside) + slots * np.count_nonzero(tied & inside) / np.count_nonzero(tied)) / k)


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """The smallest axis-aligned box holding every mask pixel, as a mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = np.zeros_like(mask)
    box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    return box


@METRICS.register("pointing_game")
class PointingGame(ScoreMetric):
    """Pointing game (Zhang et al., IJCV 2018): 1 when the map's maximum lies within `tolerance_px` of the mask.

    Choices where the references differ (METRICS.md §3): a tolerance as in the paper and TorchRay (the
    maximum is a hit when a disc of that radius around it meets the mask), default 15 px as the spec
    asks (about 9 px is the paper's scale on 128 px images); tolerance 0 is Quantus' rule. Quantus
    counts a hit if any tied maximum hits and TorchRay takes the first arg-max; here ties count by
    their share of hits (module docstring). Quantus' `weighted` option does nothing in its batched
    code and is not offered. Components: `distance_px` (mean distance of the maxima to the mask) and
    `tied_maxima`.
    """

    description = (
        "Pointing game (Zhang et al.): 1 if the map's maximum lies within `tolerance_px` of the mask, else 0 "
        "(a share when several pixels tie for the maximum); needs masks (higher is better)."
    )
    higher_is_better = True
    needs_masks = True
    params = (
        ParamSpec(
            "tolerance_px",
            "float",
            15.0,
            "A maximum this close to a mask pixel (Euclidean, in model-input pixels) is a hit; 15 as in the paper "
            "(ImageNet scale), about 9 matches it on 128 px images, 0 is Quantus' exact rule.",
            minimum=0,
            maximum=MAX_TOLERANCE_PX,
        ),
        attribution_param("signed", "signed", "absolute"),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        maps = attribution_view(checked_maps(request, self.name), str(request.params["attribution"]))
        masks = checked_masks(request, self.name)
        tolerance = float(request.params["tolerance_px"])
        values = []
        for view, mask in zip(maps, masks, strict=True):
            hit, distance, tied = pointing_hits(view, mask, tolerance)
            values.append(MetricValue(value=hit, components={"distance_px": distance, "tied_maxima": float(tied)}))
        return values


@METRICS.register("energy_pointing_game")
class EnergyPointingGame(ScoreMetric):
    """Energy-based pointing game (Score-CAM, Wang et al., CVPRW 2020): the share of the map's positive
    mass inside the object's bounding box.

    The paper uses boxes, so `region` defaults to the mask's bounding box ("mask" gives relevance mass
    accuracy's region). Negative values are clipped first, since the ratio is not shift-invariant; the
    paper's min-max normalisation is not applied, for the same reason (METRICS.md §3). A map with no
    positive mass scores 0. Component `area_share`: the region's share of the image, which is what a
    constant map scores.
    """

    description = (
        "Energy-based pointing game (Score-CAM): the share of the map's positive mass inside the mask's bounding box; "
        "needs masks (higher is better)."
    )
    higher_is_better = True
    needs_masks = True
    params = (
        ParamSpec(
            "region", "string", "box", "Where the energy counts: the mask's bounding box (the paper) or the mask itself.", choices=REGIONS
        ),
        attribution_param("positive", "positive", "absolute"),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        maps = attribution_view(checked_maps(request, self.name), str(request.params["attribution"]))
        masks = checked_masks(request, self.name)
        boxed = request.params["region"] == "box"
        values = []
        for view, mask in zip(maps, masks, strict=True):
            region = bounding_box(mask) if boxed else mask
            values.append(MetricValue(value=mass_share(view, region), components={"area_share": float(region.mean())}))
        return values


@METRICS.register("relevance_mass")
class RelevanceMass(ScoreMetric):
    """Relevance mass accuracy (Arras et al., CLEVR-XAI, 2022): the share of the map's mass inside the mask.

    Quantus' docstring says positive relevance but its code does not clip, so a signed map can leave
    [0, 1]; here negatives are clipped by default (or the absolute value is taken), keeping the value
    in [0, 1] (METRICS.md §3). A map with no mass scores 0. Component `area_share`: |S|/N, what a
    constant map scores.
    """

    description = (
        "Relevance mass accuracy (Arras et al.): the share of the map's positive mass inside the mask; needs masks (higher is better)."
    )
    higher_is_better = True
    needs_masks = True
    params = (attribution_param("positive", "positive", "absolute"),)

    def score(self, request: MetricInput) -> list[MetricValue]:
        maps = attribution_view(checked_maps(request, self.name), str(request.params["attribution"]))
        masks = checked_masks(request, self.name)
        return [
            MetricValue(value=mass_share(view, mask), components={"area_share": float(mask.mean())})
            for view, mask in zip(maps, masks, strict=True)
        ]


@METRICS.register("relevance_rank")
class RelevanceRank(ScoreMetric):
    """Relevance rank accuracy (Arras et al., CLEVR-XAI, 2022): with K = |S|, the share of the K highest
    pixels of the map that lie in the mask.

    The spec asks for a deterministic tie rule and names a stable sort; a stable sort would hand the
    tied slots to the pixels first in raster order, so ties share them instead (module docstring),
    which is as deterministic and identical when nothing ties. Component `area_share`: |S|/N, the
    expected value for a random map.
    """

    description = (
        "Relevance rank accuracy (Arras et al.): the share of the map's top-K pixels inside the mask, K = mask size; "
        "needs masks (higher is better)."
    )
    higher_is_better = True
    needs_masks = True
    params = (attribution_param("signed", "signed", "absolute"),)

    def score(self, request: MetricInput) -> list[MetricValue]:
        maps = attribution_view(checked_maps(request, self.name), str(request.params["attribution"]))
        masks = checked_masks(request, self.name)
        return [
            MetricValue(value=top_k_share(view, mask), components={"area_share": float(mask.mean())})
            for view, mask in zip(maps, masks, strict=True)
        ]
