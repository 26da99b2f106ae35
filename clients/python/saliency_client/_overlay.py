"""Saliency maps drawn over their images, with a jet-like colormap in plain numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

# Piecewise-linear RGB stops: dark blue -> blue -> cyan -> yellow -> red. Unlike matplotlib's jet,
# the top stop is bright red (no dark-red tail), so the hottest value is also the reddest colour.
_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 1.0])
_RED = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
_GREEN = np.array([0.0, 0.0, 1.0, 1.0, 0.0])
_BLUE = np.array([0.5, 1.0, 1.0, 0.0, 0.0])


def _colormap(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Values in 0..1 to RGB in 0..1, one more axis of length 3."""
    return np.stack([np.interp(values, _STOPS, channel) for channel in (_RED, _GREEN, _BLUE)], axis=-1)


def overlay(image: npt.NDArray[np.uint8], saliency: npt.NDArray[Any], alpha: float = 0.5) -> npt.NDArray[np.uint8]:
    """`image` (height x width x 3 uint8) blended with `saliency` (height x width) in colour.

    The map is min-max normalised first (a constant map becomes all zeros); `alpha` is the weight
    of the colour, 0..1.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError("overlay: image must be a uint8 numpy array")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay: image shape {image.shape} is not height x width x 3")
    if not isinstance(saliency, np.ndarray):
        raise TypeError("overlay: saliency must be a numpy array")
    if saliency.shape != image.shape[:2]:
        raise ValueError(f"overlay: saliency shape {saliency.shape} differs from the image's {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha {alpha} is outside 0..1")
    values = saliency.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    normalised = (values - low) / (high - low) if high > low else np.zeros_like(values)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * 255.0 * _colormap(normalised)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
