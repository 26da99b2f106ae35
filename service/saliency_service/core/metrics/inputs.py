"""What several metrics share: reference images, batched scoring and explaining, foils (map checks: `map_inputs`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.metrics.base import ExplainFn, MetricInput, ProgressFn
from saliency_service.core.metrics.deletion_insertion import target_scores
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import ParamSpec

REFERENCES = ("black", "white", "mean", "zero")
"""Reference values for removed pixels (Quantus' names, METRICS.md §4): the image's minimum ("black") or
maximum ("white") over all its values, its mean, or zero in normalised space (the dataset mean)."""

REFERENCE_PARAM = ParamSpec(
    "reference",
    "string",
    "black",
    "What removed pixels become: the image's minimum (black), maximum (white), mean, or zero in normalised space.",
    choices=REFERENCES,
)

# Perturbed images are scored this many at most per logits call (one call per chunk; the model splits
# further by its max batch): 64 MiB of 3 x 128 x 128 float32 images.
_CHUNK_BYTES = 64 * 1024 * 1024


def require_foils(request: MetricInput, metric: str) -> np.ndarray:
    """The request's foil classes, or FOIL_REQUIRED."""
    if request.foils is None:
        raise InvalidArgument(
            "FOIL_REQUIRED",
            f"metric '{metric}' measures a contrast 'why the target, not the foil': name a `foil` class in the request",
            {"metric": metric},
        )
    return np.asarray(request.foils, dtype=np.int64)


def reference_image(x: np.ndarray, kind: str) -> np.ndarray:
    """B x C x H x W values that removed pixels take (`REFERENCES`), computed per image."""
    if kind == "zero":
        return np.zeros_like(x)
    flat = x.reshape(len(x), -1)
    value = {"black": flat.min(axis=1), "white": flat.max(axis=1), "mean": flat.mean(axis=1)}[kind]
    return np.broadcast_to(value[:, None, None, None], x.shape).astype(x.dtype)


def score_images(
    request: MetricInput,
    count: int,
    make: Callable[[np.ndarray], np.ndarray],
    classes: np.ndarray,
    score: str,
    *,
    foils: np.ndarray | None = None,
    stage: str = "perturbation passes",
) -> np.ndarray:
    """Scores of `count` perturbed images, built `make(rows)` a large chunk at a time and forwarded together.

    `make` returns the N x C x H x W images for the given row indices; `classes[row]` is the class whose
    logit or softmax probability (`score`) is read from row's logits; with `foils`, the score of
    `foils[row]` is subtracted (a contrast).
    """
    _, channels, height, width = request.x.shape
    per_call = max(1, _CHUNK_BYTES // (channels * height * width * 4))
    values = np.empty(count, dtype=np.float64)
    for first in range(0, count, per_call):
        rows = np.arange(first, min(count, first + per_call))
        logits = request.model.logits(np.ascontiguousarray(make(rows), dtype=np.float32))
        values[rows] = target_scores(logits, classes[rows], score)
        if foils is not None:
            values[rows] -= target_scores(logits, foils[rows], score)
        request.progress(stage, int(rows[-1]) + 1, count)
    return values


def softmax_of_images(
    request: MetricInput, count: int, make: Callable[[np.ndarray], np.ndarray], *, stage: str = "perturbation passes"
) -> np.ndarray:
    """count x classes softmax probabilities of perturbed images, built and forwarded as `score_images` does."""
    _, channels, height, width = request.x.shape
    per_call = max(1, _CHUNK_BYTES // (channels * height * width * 4))
    result = np.empty((count, request.model.config.num_classes), dtype=np.float64)
    for first in range(0, count, per_call):
        rows = np.arange(first, min(count, first + per_call))
        result[rows] = softmax(request.model.logits(np.ascontiguousarray(make(rows), dtype=np.float32)))
        request.progress(stage, int(rows[-1]) + 1, count)
    return result


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so exp cannot overflow."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def require_explain(request: MetricInput, metric: str) -> ExplainFn:
    """The request's explain callback, or METHOD_REQUIRED_FOR_METRIC (the engine refuses such requests earlier)."""
    if request.explain is None:
        raise InvalidArgument(
            "METHOD_REQUIRED_FOR_METRIC",
            f"metric '{metric}' re-explains (other inputs, classes or a changed model), so it needs the method, not a finished map",
            {"metric": metric},
        )
    return request.explain


def explain_rows(
    request: MetricInput,
    make: Callable[[np.ndarray], np.ndarray],
    targets: np.ndarray,
    metric: str,
    *,
    model: LoadedModel | None = None,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """N x H x W maps of the N inputs `make(rows)` builds, explained a max batch at a time (progress after each).

    `model` swaps in another model (a randomised copy) for the request's method; `progress` replaces
    the request's progress sink (for callers that report their own stages).
    """
    explain = require_explain(request, metric)
    count = len(targets)
    maps: list[np.ndarray] = []
    report = progress or request.progress
    step = request.model.max_batch
    for first in range(0, count, step):
        rows = np.arange(first, min(count, first + step))
        # The model goes positionally: ExplainFn names its third argument only by position.
        maps.append(np.asarray(explain(np.ascontiguousarray(make(rows), dtype=np.float32), targets[rows], model), dtype=np.float64))
        report("explanations", int(rows[-1]) + 1, count)
    return np.concatenate(maps)
