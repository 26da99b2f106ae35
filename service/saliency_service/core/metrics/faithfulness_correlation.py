"""Faithfulness correlation (Bhatt, Weller, Moura, IJCAI 2020; Quantus defaults, METRICS.md §4).

For r = 1..R: draw a random subset S_r of `subset_size` pixels, set them (all channels) to the
reference, and record A_r = sum of the map over S_r and D_r = z_y(x) - z_y(x with S_r removed). The
value is Pearson(A, D) over the R runs: 1 when the map's mass predicts exactly how much removing
pixels costs. Pixels are sampled (as the paper and Quantus' per-instance code do), not flattened
C x H x W elements. Quantus also divides the map by its max |value| first; a positive scale does not
change a Pearson correlation, so that step is left out. The subsets come from the request's seed and
are the same for every image of a batch, so an image scores the same alone or in a batch. A constant
map (or a model that ignores the subsets) gives 0: no linear relation can be measured.
"""

from __future__ import annotations

import numpy as np

from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.deletion_insertion import SCORES, target_scores
from saliency_service.core.metrics.inputs import REFERENCE_PARAM, reference_image, score_images
from saliency_service.core.metrics.map_inputs import check_pixels, check_saliency
from saliency_service.core.metrics.similarity import pearson
from saliency_service.core.params import ParamSpec

MAX_RUNS = 5000


def random_subsets(seed: int, runs: int, size: int, pixels: int) -> np.ndarray:
    """runs x size pixel indices: each row drawn without replacement, from `seed` alone."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(pixels, size, replace=False) for _ in range(runs)])


@METRICS.register("faithfulness_correlation")
class FaithfulnessCorrelation(ScoreMetric):
    description = (
        "Faithfulness correlation (Bhatt et al. 2020): Pearson correlation, over random pixel subsets, between the map's "
        "sum on the subset and the drop in the target logit when the subset is removed (higher is better)."
    )
    higher_is_better = True
    params = (
        ParamSpec("runs", "int", 100, "Random subsets drawn (one forward pass each).", minimum=2, maximum=MAX_RUNS),
        ParamSpec(
            "subset_size",
            "int",
            224,
            "Pixels per subset (at most the image's pixel count; Quantus: 224 for 224 x 224 images).",
            minimum=1,
            maximum=1_000_000,
        ),
        REFERENCE_PARAM,
        ParamSpec("score", "string", "logit", "The output whose drop is measured: the target's logit (Quantus) or probability.",
                  choices=SCORES),
    )

    def score(self, request: MetricInput) -> list[MetricValue]:
        check_saliency(request, self.name)
        x = np.asarray(request.x, dtype=np.float32)
        batch, channels, height, width = x.shape
        pixels = height * width
        runs, size = int(request.params["runs"]), int(request.params["subset_size"])
        check_pixels(size, "subset_size", pixels, self.name)
        score = str(request.params["score"])
        subsets = random_subsets(request.seed, runs, size, pixels)
        reference = reference_image(x, str(request.params["reference"])).reshape(batch, channels, pixels)
        flat = x.reshape(batch, channels, pixels)
        targets = np.asarray(request.targets, dtype=np.int64)

        def make(rows: np.ndarray) -> np.ndarray:
            item, run = rows // runs, rows % runs
            removed = np.zeros((len(rows), pixels), dtype=bool)
            np.put_along_axis(removed, subsets[run], True, axis=1)
            images: np.ndarray = np.where(removed[:, None, :], reference[item], flat[item])
            return images.reshape(len(rows), channels, height, width)

        perturbed = score_images(request, batch * runs, make, np.repeat(targets, runs), score).reshape(batch, runs)
        clean = target_scores(request.model.logits(x), targets, score)
        drops = clean[:, None] - perturbed
        maps = request.saliency.reshape(batch, pixels).astype(np.float64)
        return [MetricValue(value=pearson(maps[item][subsets].sum(axis=1), drops[item])) for item in range(batch)]
