"""RFxG's group-granularity scores (Elisha et al., arXiv 2511.13081; METRICS.md §7).

A model config may name groups of labels (coarse classes, e.g. "dog" over its breeds; `shapes` has
"rounded", "polygon" and "pointed"). As for `contrastive_faithfulness`, the top floor(alpha * H * W)
pixels of the map are set to the substrate for alpha = 0.1, ..., 0.9, each masked image M is scored
by the softmax p(M), and the value is the trapezoid area under g(alpha) divided by the 0.8 span; the
paper's unnormalised area is the component "area". G is the group of the explained class a, and
mean_G averages over its members:

* `group_faithfulness` (PGS): g = mean_G [p_k(x) - p_k(M)], the group's lost probability. Higher is better.
* `class_in_group` (CGC): g = (mean_G [p_k(M) - p_k(x)] + [p_a(M) - p_a(x)]) / 2. The reference code's
  sign; lower (more probability lost by the class and its group) is better, a direction inferred from it.
* `group_contrast` (CGS, needs a foil b with group G_b): g = (mean_G [p_k(M) - p_k(x)] - mean_G_b [p_j(M) - p_j(x)]) / 2.
  The reference code adds the second term; the contrast "group of a, not group of b" subtracts it,
  as METRICS.md §7 expects; lower is better.

A model that ignores its input scores 0 on all three. A class in no group, or a model without groups,
is refused with a reason.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from saliency_service.core.errors import FailedPrecondition, InvalidArgument
from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric
from saliency_service.core.metrics.contrastive_faithfulness import ALPHAS, top_removed
from saliency_service.core.metrics.deletion_insertion import SUBSTRATES
from saliency_service.core.metrics.inputs import require_foils, softmax, softmax_of_images
from saliency_service.core.metrics.map_inputs import check_saliency
from saliency_service.core.params import ParamSpec

SPAN = float(ALPHAS[-1] - ALPHAS[0])


def group_members(request: MetricInput, classes: np.ndarray, metric: str, role: str = "target") -> list[np.ndarray]:
    """The member indices of each class's group (the model config's `groups`)."""
    config = request.model.config
    if not config.groups:
        raise FailedPrecondition(
            "MODEL_HAS_NO_GROUPS",
            f"metric '{metric}' compares a class with its group, and model '{config.name}' defines no label groups "
            "(`groups` in its config.json)",
            {"metric": metric, "model": config.name},
        )
    members = []
    for index in classes:
        found = config.group_of(int(index))
        if found is None:
            raise InvalidArgument(
                "CLASS_IN_NO_GROUP",
                f"metric '{metric}': the {role} class '{config.labels[int(index)]}' belongs to no group of model "
                f"'{config.name}'; groups: {', '.join(config.groups)}",
                {"metric": metric, "class": int(index)},
            )
        members.append(np.asarray(found[1], dtype=np.int64))
    return members


class _GroupMetric(ScoreMetric):
    """The shared masking curve; subclasses say what g(alpha) is."""

    params = (
        ParamSpec(
            "substrate",
            "string",
            "zero",
            "What removed pixels become: zero in normalised space (the dataset mean; RFxG's mask value 0) or the "
            "11x11 sigma=5 Gaussian blur of the image.",
            choices=SUBSTRATES,
        ),
    )

    @abstractmethod
    def curve(self, clean: np.ndarray, masked: np.ndarray, target: int, group: np.ndarray, foil_group: np.ndarray | None) -> np.ndarray:
        """g(alpha) per alpha from the clean probabilities (classes) and the masked ones (alphas x classes)."""

    def score(self, request: MetricInput) -> list[MetricValue]:
        check_saliency(request, self.name)
        targets = np.asarray(request.targets, dtype=np.int64)
        groups = group_members(request, targets, self.name)
        foil_groups: list[np.ndarray | None] = [None] * len(targets)
        if self.needs_foil:
            foil_groups = list(group_members(request, require_foils(request, self.name), self.name, "foil"))
        x = np.ascontiguousarray(request.x, dtype=np.float32)
        batch, points = len(x), len(ALPHAS)
        make = top_removed(request, str(request.params["substrate"]))
        masked = softmax_of_images(request, batch * points, make).reshape(batch, points, -1)
        clean = softmax(request.model.logits(x))
        values = []
        for item in range(batch):
            curve = self.curve(clean[item], masked[item], int(targets[item]), groups[item], foil_groups[item])
            area = float(np.trapezoid(curve, ALPHAS))
            values.append(MetricValue(value=area / SPAN, curve=curve, curve_x=ALPHAS.copy(), components={"area": area}))
        return values


@METRICS.register("group_faithfulness")
class GroupFaithfulness(_GroupMetric):
    description = (
        "RFxG's PGS: the probability the target's label group loses as the top 10%..90% of the map are removed, averaged "
        "over the removed share (higher is better); needs label groups in the model config."
    )
    higher_is_better = True

    def curve(self, clean: np.ndarray, masked: np.ndarray, target: int, group: np.ndarray, foil_group: np.ndarray | None) -> np.ndarray:
        lost: np.ndarray = (clean[group][None, :] - masked[:, group]).mean(axis=1)
        return lost


@METRICS.register("class_in_group")
class ClassInGroup(_GroupMetric):
    description = (
        "RFxG's CGC: the mean of the group's and the class's probability change as the top of the map is removed "
        "(lower is better); needs label groups in the model config."
    )
    higher_is_better = False

    def curve(self, clean: np.ndarray, masked: np.ndarray, target: int, group: np.ndarray, foil_group: np.ndarray | None) -> np.ndarray:
        change: np.ndarray = ((masked[:, group] - clean[group][None, :]).mean(axis=1) + (masked[:, target] - clean[target])) / 2
        return change


@METRICS.register("group_contrast")
class GroupContrast(_GroupMetric):
    description = (
        "RFxG's CGS as a contrast: half the target group's probability change minus the foil group's as the top of a "
        "contrastive map is removed (lower is better); needs a foil and label groups."
    )
    higher_is_better = False
    needs_foil = True

    def curve(self, clean: np.ndarray, masked: np.ndarray, target: int, group: np.ndarray, foil_group: np.ndarray | None) -> np.ndarray:
        assert foil_group is not None  # needs_foil: the engine and `score` require the foil
        own = (masked[:, group] - clean[group][None, :]).mean(axis=1)
        other = (masked[:, foil_group] - clean[foil_group][None, :]).mean(axis=1)
        contrast: np.ndarray = (own - other) / 2
        return contrast
