"""Deletion and insertion (Petsiuk et al., RISE, BMVC 2018; METRICS.md §1).

Pixels are ranked by saliency (descending, ties by pixel index). Deletion replaces them chunk by
chunk with a substrate and watches the target score fall; insertion starts from the substrate and
puts the original pixels back. The value is the area under the n+1-point curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.images import gaussian_blur
from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ProgressFn, ScoreMetric, no_progress
from saliency_service.core.metrics.map_inputs import check_pixels, check_saliency
from saliency_service.core.params import ParamSpec

MAX_STEP = 1_000_000
SUBSTRATES = ("zero", "blur")
SCORES = ("probability", "logit")
# Curve images are built and scored this many bytes at a time: all steps of all items share
# large forward batches (341 images of 3x128x128 per call), while step=1 on a large image
# cannot exhaust memory.
_CHUNK_BYTES = 64 * 1024 * 1024

LogitsFn = Callable[[np.ndarray], np.ndarray]


def trapezoid_auc(curve: np.ndarray) -> float:
    """Area under n+1 scores on a uniform grid over [0, 1]: (sum - (first + last) / 2) / n."""
    n = len(curve) - 1
    if n < 1:
        raise InvalidArgument("CURVE_TOO_SHORT", f"an AUC needs at least 2 curve points, got {len(curve)}")
    return float((curve.sum() - (curve[0] + curve[-1]) / 2) / n)


def pixel_ranks(saliency: np.ndarray) -> np.ndarray:
    """B x P rank of every pixel: 0 for the most salient; equal saliency keeps pixel-index order."""
    flat = saliency.reshape(len(saliency), -1).astype(np.float64)
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(flat.shape[1]), order.shape), axis=1)
    return ranks


def target_scores(logits: np.ndarray, targets: np.ndarray, score: str) -> np.ndarray:
    """Each row's target logit, or its softmax probability."""
    logits = logits.astype(np.float64)
    rows = np.arange(len(logits))
    chosen: np.ndarray = logits[rows, targets]
    if score == "logit":
        return chosen
    # Shift by the row max so exp cannot overflow.
    top = logits.max(axis=1)
    result: np.ndarray = np.exp(chosen - top) / np.exp(logits - top[:, None]).sum(axis=1)
    return result


def perturbation_curves(
    logits_fn: LogitsFn,
    start: np.ndarray,
    end: np.ndarray,
    saliency: np.ndarray,
    targets: np.ndarray,
    *,
    step: int,
    score: str,
    progress: ProgressFn = no_progress,
    max_batch: int = 1,
) -> np.ndarray:
    """B x (n+1) target scores as pixels switch from `start` to `end` in saliency order, `step` at a time.

    Point i has the top min(i*step, H*W) pixels taken from `end`; n = ceil(H*W / step). Deletion is
    start = x, end = substrate; insertion is start = substrate, end = x. A chunk of curve images holds a
    whole number of `max_batch` (the model's forward batch) where it can, so only the last forward pass is
    a short one.
    """
    batch, channels, height, width = start.shape
    pixels = height * width
    n = math.ceil(pixels / step)
    ranks = pixel_ranks(saliency)
    start_flat = start.reshape(batch, channels, pixels)
    end_flat = end.reshape(batch, channels, pixels)

    rows = batch * (n + 1)
    rows_per_call = max(1, _CHUNK_BYTES // (channels * pixels * 4))
    if rows_per_call >= max_batch:
        rows_per_call -= rows_per_call % max_batch
    curves = np.empty(rows, dtype=np.float64)
    for first in range(0, rows, rows_per_call):
        last = min(rows, first + rows_per_call)
        index = np.arange(first, last)
        item, point = index // (n + 1), index % (n + 1)
        images = np.empty((len(index), channels, pixels), dtype=np.float32)
        # Each item's rows are a contiguous run of the chunk: its start image is broadcast over them, then its
        # end image written where a row's pixels have switched, with no per-row copy of either image.
        for b in range(int(item[0]), int(item[-1]) + 1):
            run = slice(max(first, b * (n + 1)) - first, min(last, (b + 1) * (n + 1)) - first)
            switched = ranks[b][None, :] < (point[run] * step)[:, None]
            np.copyto(images[run], start_flat[b])
            np.copyto(images[run], end_flat[b], where=switched[:, None, :])
        logits = logits_fn(images.reshape(len(index), channels, height, width))
        curves[index] = target_scores(logits, targets[item], score)
        progress("perturbation passes", int(index[-1]) + 1, rows)
    return curves.reshape(batch, n + 1)


def curve_fractions(pixels: int, step: int) -> np.ndarray:
    """The x of each curve point: the share of pixels switched, min(i * step, pixels) / pixels."""
    n = math.ceil(pixels / step)
    fractions: np.ndarray = np.minimum(np.arange(n + 1) * step, pixels) / pixels
    return fractions


def _check(request: MetricInput, step: int, metric: str) -> None:
    _, _, height, width = request.x.shape
    check_saliency(request, metric)
    check_pixels(step, "step", height * width, metric)


def _params(default_substrate: str, substrate_help: str) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec(
            "step",
            "int",
            128,
            "Pixels changed per curve step (at most the image's pixel count); RISE uses one image row.",
            minimum=1,
            maximum=MAX_STEP,
        ),
        ParamSpec("substrate", "string", default_substrate, substrate_help, choices=SUBSTRATES),
        ParamSpec("score", "string", "probability", "Curve value: the target's softmax probability (RISE) or its logit.", choices=SCORES),
    )


class _PerturbationMetric(ScoreMetric):
    """Shared scoring for deletion and insertion; `inserting` says which way pixels move."""

    inserting: bool

    def score(self, request: MetricInput) -> list[MetricValue]:
        step = int(request.params["step"])
        _check(request, step, self.name)
        x = np.ascontiguousarray(request.x, dtype=np.float32)
        if request.params["substrate"] == "blur":
            substrate = gaussian_blur(torch.from_numpy(x)).numpy()
        else:
            substrate = np.zeros_like(x)
        start, end = (substrate, x) if self.inserting else (x, substrate)
        targets = np.asarray(request.targets, dtype=np.int64)
        score = str(request.params["score"])
        curves = perturbation_curves(
            request.model.logits,
            start,
            end,
            request.saliency,
            targets,
            step=step,
            score=score,
            progress=request.progress,
            max_batch=request.model.max_batch,
        )
        fractions = curve_fractions(x.shape[2] * x.shape[3], step)
        return [MetricValue(value=trapezoid_auc(curve), curve=curve, curve_x=fractions) for curve in curves]


@METRICS.register("deletion")
class Deletion(_PerturbationMetric):
    description = "Deletion AUC: the target score as the most salient pixels are removed first (lower is better)."
    higher_is_better = False
    inserting = False
    params = _params("zero", "What removed pixels become: zero in normalised space (the dataset mean; RISE) or the blurred image.")


@METRICS.register("insertion")
class Insertion(_PerturbationMetric):
    description = "Insertion AUC: the target score as the most salient pixels are restored first onto a blurred image (higher is better)."
    higher_is_better = True
    inserting = True
    params = _params("blur", "The starting image: the 11x11 sigma=5 Gaussian blur of the input (RISE) or zero in normalised space.")
