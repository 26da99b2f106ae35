"""Checked inputs for the metrics that read only the map (and a ground-truth mask): no forward passes.

Shared by the localisation (METRICS.md §3, §8) and complexity (§4) metrics: the map's shape and
finiteness, the masks' presence, shape and emptiness, and the `attribution` view a metric scores
(signed, positive part or absolute value).
"""

from __future__ import annotations

import numpy as np

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.metrics.base import MetricInput
from saliency_service.core.params import ParamSpec

_ATTRIBUTION_HELP = {
    "signed": "the map as it is",
    "positive": "negative values clipped to zero",
    "absolute": "the absolute value",
}


def attribution_param(default: str, *choices: str) -> ParamSpec:
    """The `attribution` parameter: which view of the map a metric scores."""
    described = "; ".join(f"{choice}: {_ATTRIBUTION_HELP[choice]}" for choice in choices)
    return ParamSpec("attribution", "string", default, f"Which view of the map is scored ({described}).", choices=choices)


def attribution_view(maps: np.ndarray, attribution: str) -> np.ndarray:
    """The signed maps, their positive part or their absolute value."""
    view: np.ndarray = maps
    if attribution == "positive":
        view = np.maximum(maps, 0.0)
    elif attribution == "absolute":
        view = np.abs(maps)
    return view


def check_saliency(request: MetricInput, metric: str) -> None:
    """Refuse maps that are not one finite H x W map per image at the model's input resolution."""
    batch, _, height, width = request.x.shape
    if request.saliency.shape != (batch, height, width):
        raise InvalidArgument(
            "SALIENCY_SHAPE_MISMATCH",
            f"{metric}: saliency maps have shape {request.saliency.shape}; they must be {(batch, height, width)}, "
            "one map per image at the model's input resolution",
            {"metric": metric},
        )
    if not np.isfinite(request.saliency).all():
        raise InvalidArgument("NON_FINITE_SALIENCY", f"{metric}: saliency maps contain NaN or infinity", {"metric": metric})


def check_pixels(value: int, name: str, pixels: int, metric: str) -> None:
    """Refuse a pixel count larger than the image."""
    if value > pixels:
        raise InvalidArgument(
            "PARAMETER_OUT_OF_RANGE",
            f"{metric}: {name} = {value} is larger than the image's {pixels} pixels; use at most {pixels}",
            {"parameter": name, "owner": metric, "maximum": pixels},
        )


def checked_maps(request: MetricInput, metric: str) -> np.ndarray:
    """B x H x W float64 maps, one per image at the model's input resolution, all finite."""
    check_saliency(request, metric)
    return np.asarray(request.saliency, dtype=np.float64)


def checked_masks(request: MetricInput, metric: str) -> np.ndarray:
    """B x H x W bool ground-truth masks, each with at least one pixel on the object."""
    batch, _, height, width = request.x.shape
    if request.masks is None:
        raise InvalidArgument(
            "MASKS_REQUIRED",
            f"metric '{metric}' measures localisation against a ground truth: send `masks`, one per image (nonzero on the object)",
            {"metric": metric},
        )
    if request.masks.shape != (batch, height, width):
        raise InvalidArgument(
            "MASK_SHAPE_MISMATCH",
            f"{metric}: masks have shape {request.masks.shape}; they must be {(batch, height, width)}, one per image",
            {"metric": metric},
        )
    masks = np.asarray(request.masks, dtype=bool)
    for index, mask in enumerate(masks):
        if not mask.any():
            raise InvalidArgument(
                "EMPTY_MASK",
                f"{metric}: mask {index} has no pixel on the object at the model's {height}x{width} input resolution "
                "(a mask smaller than about one model pixel vanishes when resized); localisation needs a non-empty mask",
                {"metric": metric, "mask_index": str(index)},
            )
    return masks
