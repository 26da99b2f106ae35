"""The Score-metric contract: one class per metric, registered under its wire id."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import ParamSpec, ParamValue
from saliency_service.core.registry import Registry

ExplainFn = Callable[..., np.ndarray]
"""explain(x, targets, model=None) -> B x H x W maps at the model's input resolution, made by the
request's method with its parameters, layers, seed and foil; `model` swaps in another model (e.g. a
randomised copy) for the same method. When x holds k inputs per image, lay them out item-major
(x[i * k + j] belongs to image i): supplied baselines are repeated that way."""

ProgressFn = Callable[[str, int, int], None]
"""progress(stage, done, total): how far the metric has come; streamed to ScoreStream callers."""


def no_progress(stage: str, done: int, total: int) -> None:
    """The progress sink of a caller that does not watch."""


@dataclass(frozen=True)
class MetricInput:
    model: LoadedModel
    x: np.ndarray
    """B x C x H x W float32, normalised as the model expects."""
    saliency: np.ndarray
    """B x H x W float32 maps at the model's input resolution."""
    targets: np.ndarray
    """B int64 class indices the maps explain."""
    params: Mapping[str, ParamValue]
    seed: int
    masks: np.ndarray | None = None
    """B x H x W bool ground-truth masks at the model's input resolution (metrics with `needs_masks`)."""
    explain: ExplainFn | None = None
    """Re-runs the request's method (metrics with `needs_method`); None when the caller supplied maps."""
    foils: np.ndarray | None = None
    """B int64 foil classes when the request named a foil."""
    progress: ProgressFn = no_progress


@dataclass(frozen=True)
class MetricValue:
    value: float
    curve: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """The metric's curve (e.g. p(target) after each deletion step); empty when it has none."""
    curve_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """The x of each curve point (e.g. the share of pixels removed); empty when the curve has none."""
    components: Mapping[str, float] = field(default_factory=dict)
    """Named parts of the value where it has several (e.g. ROAD's "morf" and "lerf")."""
    maps: tuple[np.ndarray, ...] = ()
    """Images the metric returns (H x W float32), e.g. AggAtt's aggregate maps."""


class ScoreMetric(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    higher_is_better: ClassVar[bool]
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    needs_masks: ClassVar[bool] = False
    """Localisation metrics: the request must carry one ground-truth mask per image."""
    needs_method: ClassVar[bool] = False
    """Metrics that re-explain (other inputs, classes or models): the request must name a method."""
    needs_foil: ClassVar[bool] = False
    """Contrastive metrics: the request must name a foil class; a caller's supplied maps may come with one."""

    @abstractmethod
    def score(self, request: MetricInput) -> list[MetricValue]:
        """One value per item, all forward passes batched through `request.model.logits`."""


METRICS: Registry[type[ScoreMetric]] = Registry("metric")
