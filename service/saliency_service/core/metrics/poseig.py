"""PoseIG's indices (He et al., CVPR 2023; METRICS.md §8), transferred from keypoints to classification:
foreground index, locality index and diffusion index. They read the map (and the mask) only: no forward passes.

As in PoseIG's code the map is made absolute (by default) and divided by its total, â = |a| / Σ|a|;
its division by the maximum first does not change â.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.complexity import gini_index
from saliency_service.core.metrics.map_inputs import attribution_param, attribution_view, checked_maps, checked_masks
from saliency_service.core.params import ParamSpec

MAX_DILATION_PX = 256


def density_index(view: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """(index, mass): the weighted mass of â = view / Σ view, Σ â·w, over the mean weight Σ w / N, and that mass.

    1 when the map is uniform; 0 when the map has no mass (PoseIG maps its NaN to 0).
    """
    total = view.sum()
    if total <= 0:
        return 0.0, 0.0
    mass = float((view * weights).sum() / total)
    return mass * weights.size / float(weights.sum()), mass


def centroid_gaussian(mask: np.ndarray, sigma_scale: float) -> tuple[np.ndarray, float]:
    """(h, sigma_px): a unit-peak Gaussian at the mask's centroid with sigma = sigma_scale * sqrt(|S| / pi),
    the radius of a disc as large as the object."""
    rows, cols = np.nonzero(mask)
    sigma = sigma_scale * math.sqrt(rows.size / math.pi)
    y, x = np.ogrid[: mask.shape[0], : mask.shape[1]]
    squared = (y - rows.mean()) ** 2 + (x - cols.mean()) ** 2
    return np.exp(-squared / (2 * sigma**2)), sigma


@METRICS.register("foreground_index")
class ForegroundIndex(ScoreMetric):
    """Foreground index (PoseIG): the attribution density inside the dilated mask M' over the image's mean
    density, FI = Σ_{M'} â · N / |M'|.

    PoseIG dilates the person mask by a 5x5 max-pool at stride 1 (`dilation_px` = 2). 1 means no
    preference for the object, N/|M'| is the maximum, and a map with no mass scores 0 (PoseIG maps NaN
    to 0). Components: `mass_share` = FI·|M'|/N, the relevance mass on M' in [0, 1], comparable across
    object sizes (METRICS.md §8), and `area_share` = |M'|/N.
    """

    description = (
        "Foreground index (PoseIG): the map's density on the (dilated) mask over its mean density; 1 = no preference "
        "for the object; needs masks (higher is better)."
    )
    higher_is_better = True
    needs_masks = True
    params = (
        ParamSpec(
            "dilation_px",
            "int",
            2,
            "Grow the mask by this many pixels (a square max filter, as PoseIG's 5x5 max-pool for 2) before measuring.",
            minimum=0,
            maximum=MAX_DILATION_PX,
        ),
        attribution_param("absolute", "absolute", "positive"),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        maps = attribution_view(checked_maps(request, self.name), str(request.params["attribution"]))
        masks = checked_masks(request, self.name)
        grow = int(request.params["dilation_px"])
        values = []
        for view, mask in zip(maps, masks, strict=True):
            region = ndimage.binary_dilation(mask, np.ones((2 * grow + 1, 2 * grow + 1), dtype=bool)) if grow else mask
            index, mass = density_index(view, region.astype(np.float64))
            values.append(MetricValue(value=index, components={"mass_share": mass, "area_share": float(region.mean())}))
        return values


@METRICS.register("locality_index")
class LocalityIndex(ScoreMetric):
    """Locality index (PoseIG): the attribution density weighted by a Gaussian h at the object over the mean
    weight, LI = Σ â·h · N / Σ h.

    PoseIG's h is the keypoint's ground-truth heatmap. For classification the spec allows a Gaussian at the
    object's centroid with sigma proportional to its size, or the blurred mask; the centroid Gaussian is used,
    since the blurred mask would mostly repeat the foreground index. sigma = `sigma_scale` times the radius
    of a disc as large as the object. 1 for a uniform map, 0 for a map with no mass. Component `sigma_px`.
    """

    description = (
        "Locality index (PoseIG): the map's density weighted by a Gaussian at the object's centroid over the mean weight; "
        "1 = no preference; needs masks (higher is better)."
    )
    higher_is_better = True
    needs_masks = True
    params = (
        ParamSpec(
            "sigma_scale",
            "float",
            0.5,
            "The Gaussian's sigma as a multiple of the object's size (the radius of a disc of the mask's area).",
            minimum=0.01,
            maximum=100,
        ),
        attribution_param("absolute", "absolute", "positive"),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        maps = attribution_view(checked_maps(request, self.name), str(request.params["attribution"]))
        masks = checked_masks(request, self.name)
        scale = float(request.params["sigma_scale"])
        values = []
        for view, mask in zip(maps, masks, strict=True):
            weights, sigma = centroid_gaussian(mask, scale)
            index, _ = density_index(view, weights)
            values.append(MetricValue(value=index, components={"sigma_px": sigma}))
        return values


@METRICS.register("diffusion_index")
class DiffusionIndex(ScoreMetric):
    """Diffusion index (PoseIG): DI = 100 · (1 − Gini(â)), with the Gini index of `sparseness`.

    100 for a uniform map, about 100/n for a one-hot map: higher means more diffuse, so lower is better
    here, in line with sparseness (higher better) and complexity (lower better). It is 100 · (1 −
    sparseness) and reads the map alone, so unlike FI and LI it takes no masks (a request with masks is
    refused as MASKS_NOT_USED).
    """

    description = "Diffusion index (PoseIG): 100 * (1 - Gini(|map|)); 100 for a uniform map, about 100/n for one pixel (lower is better)."
    higher_is_better = False
    params = (attribution_param("absolute", "absolute", "positive"),)

    def score(self, request: MetricInput) -> list[MetricValue]:
        maps = attribution_view(checked_maps(request, self.name), str(request.params["attribution"]))
        return [MetricValue(value=100.0 * (1.0 - gini_index(view))) for view in maps]
