"""ROAD: RemOve And Debias (Rong, Leemann et al., ICML 2022; METRICS.md §2).

Removed pixels are not set to a constant (which the model can detect as a shape) but filled by noisy
linear imputation: each becomes the weighted mean of its 8 neighbours (1/6 for edge neighbours, 1/12
for diagonals; neighbours outside the image are dropped), solved jointly as one sparse linear system
per image, then Gaussian noise (sigma = `noise`) is added to the imputed pixels only. As in the
original code, imputation works on the unnormalised [0, 1] image, which is normalised again after.

MoRF removes the top share p of the pixels by saliency, LeRF the bottom share p (pixels ranked by
`pixel_ranks`: descending, ties by pixel index). At each p the target's softmax probability (or logit)
on the imputed image is one curve point. A good map makes MoRF fall fast and LeRF stay high, so the
value is (mean LeRF - mean MoRF) / 2 (pytorch-grad-cam's ROADCombined; the clean score cancels out),
higher is better. `curve` holds the MoRF points then the LeRF points, `curve_x` the removed shares
for each (so twice); components "morf" and "lerf" are each curve's mean (its area over the shares,
normalised), "clean" the score of the untouched image.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import splu

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.deletion_insertion import SCORES, pixel_ranks, target_scores
from saliency_service.core.metrics.inputs import score_images
from saliency_service.core.metrics.map_inputs import check_saliency
from saliency_service.core.params import ParamSpec

DEFAULT_PERCENTAGES = "10,20,30,40,50,70,90"
MAX_PERCENTAGES = 99
ORDERS = ("morf", "lerf")
# The 8-neighbourhood (dy, dx, weight): edge neighbours 1/6, diagonals 1/12; they sum to 1.
_NEIGHBOURS = tuple(
    (dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
)


def linear_impute(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """C x H x W `image` with the `removed` (H x W bool) pixels replaced by the weighted mean of their neighbours.

    Solves w_tot(i) v_i - sum_{removed j ~ i} w_ij v_j = sum_{kept j ~ i} w_ij x_j for all removed i at
    once (one sparse LU, one right-hand side per channel). Every image pixel must not be removed:
    with nothing kept the system is singular.
    """
    channels, height, width = image.shape
    unknown = np.flatnonzero(removed.ravel())
    result = image.astype(np.float64).reshape(channels, -1).copy()
    if len(unknown) == 0:
        return result.reshape(image.shape)
    position = np.full(height * width, -1)
    position[unknown] = np.arange(len(unknown))
    ys, xs = np.divmod(unknown, width)
    diagonal = np.zeros(len(unknown))
    rhs = np.zeros((len(unknown), channels))
    rows, cols, values = [np.arange(len(unknown))], [np.arange(len(unknown))], []
    for dy, dx, weight in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        diagonal[inside] += weight
        neighbour = np.where(inside, ny * width + nx, 0)
        coupled = inside & (position[neighbour] >= 0)
        rows.append(np.flatnonzero(coupled))
        cols.append(position[neighbour[coupled]])
        values.append(np.full(int(coupled.sum()), -weight))
        known = inside & ~coupled
        rhs[known] += weight * result[:, neighbour[known]].T
    matrix = csc_matrix((np.concatenate([diagonal, *values]), (np.concatenate(rows), np.concatenate(cols))), shape=(len(unknown),) * 2)
    solved = splu(matrix).solve(rhs)
    result[:, unknown] = solved.T
    return result.reshape(image.shape)


def parse_percentages(text: str, metric: str) -> np.ndarray:
    """The comma-separated removal percentages: distinct numbers in [0, 99], at most 99 of them, in order."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgument(
            "INVALID_PARAMETER",
            f"{metric}: parameter 'percentages' must be comma-separated numbers such as '{DEFAULT_PERCENTAGES}', got '{text}'",
            {"parameter": "percentages", "owner": metric},
        ) from None
    if not values or len(values) > MAX_PERCENTAGES or len(set(values)) != len(values):
        raise InvalidArgument(
            "INVALID_PARAMETER",
            f"{metric}: parameter 'percentages' needs 1 to {MAX_PERCENTAGES} distinct values, got '{text}'",
            {"parameter": "percentages", "owner": metric},
        )
    if min(values) < 0 or max(values) > 99:
        raise InvalidArgument(
            "PARAMETER_OUT_OF_RANGE",
            f"{metric}: removal percentages must lie in [0, 99] (removing every pixel leaves nothing to impute from), got '{text}'",
            {"parameter": "percentages", "owner": metric, "minimum": "0", "maximum": "99"},
        )
    return np.sort(np.asarray(values)) / 100.0


@METRICS.register("road")
class Road(ScoreMetric):
    description = (
        "ROAD (Rong et al. 2022): the target score after removing the most (MoRF) and least (LeRF) relevant pixels, "
        "filled by noisy linear imputation; value (mean LeRF - mean MoRF) / 2 (higher is better)."
    )
    higher_is_better = True
    params = (
        ParamSpec(
            "percentages",
            "string",
            DEFAULT_PERCENTAGES,
            "Comma-separated shares of pixels to remove, in percent, each in [0, 99] (the paper's experiments: 10,20,30,40,50,70,90).",
        ),
        ParamSpec(
            "noise",
            "float",
            0.01,
            "Standard deviation of the Gaussian noise added to imputed pixels, in [0, 1] image units (the paper: 0.01).",
            minimum=0.0,
            maximum=1.0,
        ),
        ParamSpec("score", "string", "probability", "Curve value: the target's softmax probability or its logit.", choices=SCORES),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        check_saliency(request, self.name)
        shares = parse_percentages(str(request.params["percentages"]), self.name)
        noise = float(request.params["noise"])
        score = str(request.params["score"])
        x = np.asarray(request.x, dtype=np.float32)
        batch, _, height, width = x.shape
        pixels = height * width
        spec = request.model.config.input
        mean = np.asarray(spec.mean, dtype=np.float64)[:, None, None]
        std = np.asarray(spec.std, dtype=np.float64)[:, None, None]
        ranks = pixel_ranks(request.saliency).reshape(batch, height, width)
        removed_counts = np.floor(shares * pixels).astype(np.int64)
        targets = np.asarray(request.targets, dtype=np.int64)
        points = len(shares)
        per_item = len(ORDERS) * points

        def imputed(row: int) -> np.ndarray:
            item, rest = divmod(row, per_item)
            order, point = divmod(rest, points)
            count = removed_counts[point]
            removed = ranks[item] < count if ORDERS[order] == "morf" else ranks[item] >= pixels - count
            filled = linear_impute(x[item] * std + mean, removed)
            # Noise seeded by the request's seed, the order and the share, not the item's place in the batch.
            rng = np.random.default_rng([request.seed, order, point])
            filled[:, removed] += noise * rng.standard_normal((filled.shape[0], int(removed.sum())))
            # Kept pixels stay bit-identical to x: only the imputed ones go back through the normalisation.
            image: np.ndarray = x[item].copy()
            image[:, removed] = ((filled - mean) / std)[:, removed]
            return image

        def make(rows: np.ndarray) -> np.ndarray:
            return np.stack([imputed(int(row)) for row in rows])

        rows = batch * per_item
        scores = score_images(request, rows, make, np.repeat(targets, per_item), score, stage="imputed images").reshape(batch, 2, points)
        clean = target_scores(request.model.logits(x), targets, score)
        values = []
        for item in range(batch):
            morf, lerf = scores[item]
            values.append(
                MetricValue(
                    value=float((lerf.mean() - morf.mean()) / 2),
                    curve=np.concatenate([morf, lerf]),
                    curve_x=np.concatenate([shares, shares]),
                    components={"morf": float(morf.mean()), "lerf": float(lerf.mean()), "clean": float(clean[item])},
                )
            )
        return values
