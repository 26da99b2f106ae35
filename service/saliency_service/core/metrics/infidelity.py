"""Infidelity (Yeh, Hsieh, Suggala, Inouye, Ravikumar, NeurIPS 2019; METRICS.md §4).

INFD = E_I[(beta * I'Phi - (z_y(x) - z_y(x - I)))^2] over random perturbations I, with logits. As the
spec recommends, the perturbations are independent (not Quantus' cumulative raster sweep): each sample
sets one `patch_size` x `patch_size` square, at a uniformly random position, to the reference (Yeh's
"square" perturbation, sampled rather than enumerated). The map is read as each pixel's contribution
to the target (as gradient x input is), so the change it predicts for removing the square S is
I'Phi = the map's sum over S. `rescale` applies Yeh's optimal scale beta = E[D * I'Phi] / E[(I'Phi)^2]
(Captum's `normalize`), so a map right up to a positive factor scores 0; without it beta = 1. Both
are returned as components. Lower is better; the squares come from the request's seed alone, the same
for every image of a batch.
"""

from __future__ import annotations

import numpy as np

from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.deletion_insertion import SCORES, target_scores
from saliency_service.core.metrics.inputs import REFERENCE_PARAM, reference_image, score_images
from saliency_service.core.metrics.map_inputs import check_pixels, check_saliency
from saliency_service.core.params import ParamSpec

MAX_SAMPLES = 5000


def random_squares(seed: int, samples: int, size: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The top and left corners of `samples` size x size squares at uniformly random positions inside the image."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, height - size + 1, samples), rng.integers(0, width - size + 1, samples)


def square_masks(tops: np.ndarray, lefts: np.ndarray, size: int, height: int, width: int) -> np.ndarray:
    """N x H x W bool: each square's pixels."""
    rows = np.arange(height)[None, :, None]
    cols = np.arange(width)[None, None, :]
    inside_rows = (rows >= tops[:, None, None]) & (rows < tops[:, None, None] + size)
    inside_cols = (cols >= lefts[:, None, None]) & (cols < lefts[:, None, None] + size)
    masks: np.ndarray = inside_rows & inside_cols
    return masks


def square_sums(saliency: np.ndarray, tops: np.ndarray, lefts: np.ndarray, size: int) -> np.ndarray:
    """The H x W map's sum over each square, from its integral image."""
    integral = np.zeros((saliency.shape[0] + 1, saliency.shape[1] + 1))
    integral[1:, 1:] = saliency.astype(np.float64).cumsum(axis=0).cumsum(axis=1)
    bottoms, rights = tops + size, lefts + size
    sums: np.ndarray = integral[bottoms, rights] - integral[tops, rights] - integral[bottoms, lefts] + integral[tops, lefts]
    return sums


def infidelity(predicted: np.ndarray, drops: np.ndarray, rescale: bool) -> tuple[float, float]:
    """The mean squared error between beta * predicted and the observed drops, and beta."""
    predicted = np.asarray(predicted, dtype=np.float64)
    drops = np.asarray(drops, dtype=np.float64)
    beta = 1.0
    if rescale:
        energy = float(predicted @ predicted)
        beta = float(predicted @ drops) / energy if energy > 0 else 0.0
    return float(np.mean((beta * predicted - drops) ** 2)), beta


@METRICS.register("infidelity")
class Infidelity(ScoreMetric):
    description = (
        "Infidelity (Yeh et al. 2019): mean squared error between the map's sum over a random removed square and the "
        "drop in the target logit it causes, after optimal rescaling (lower is better)."
    )
    higher_is_better = False
    params = (
        ParamSpec("samples", "int", 200, "Random squares removed, one forward pass each.", minimum=1, maximum=MAX_SAMPLES),
        ParamSpec("patch_size", "int", 4, "Side of each removed square in pixels (at most the image's side).", minimum=1, maximum=4096),
        REFERENCE_PARAM,
        ParamSpec("rescale", "bool", True, "Rescale the map by Yeh's optimal beta before the error (False: beta = 1)."),
        ParamSpec("score", "string", "logit", "The output whose drop is measured: the target's logit (Yeh, Quantus) or probability.",
                  choices=SCORES),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        check_saliency(request, self.name)
        x = np.asarray(request.x, dtype=np.float32)
        batch, channels, height, width = x.shape
        samples, size = int(request.params["samples"]), int(request.params["patch_size"])
        check_pixels(size, "patch_size", min(height, width), self.name)
        rescale, score = bool(request.params["rescale"]), str(request.params["score"])
        tops, lefts = random_squares(request.seed, samples, size, height, width)
        reference = reference_image(x, str(request.params["reference"]))
        targets = np.asarray(request.targets, dtype=np.int64)

        def make(rows: np.ndarray) -> np.ndarray:
            item, sample = rows // samples, rows % samples
            removed = square_masks(tops[sample], lefts[sample], size, height, width)
            images: np.ndarray = np.where(removed[:, None], reference[item], x[item])
            return images

        perturbed = score_images(request, batch * samples, make, np.repeat(targets, samples), score).reshape(batch, samples)
        clean = target_scores(request.model.logits(x), targets, score)
        values = []
        for item in range(batch):
            predicted = square_sums(request.saliency[item], tops, lefts, size)
            drops = clean[item] - perturbed[item]
            rescaled, beta = infidelity(predicted, drops, True)
            raw, _ = infidelity(predicted, drops, False)
            values.append(
                MetricValue(value=rescaled if rescale else raw, components={"rescaled": rescaled, "raw": raw, "beta": beta})
            )
        return values
