"""The Score-metric contract: one class per metric, registered under its wire id."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import ParamSpec, ParamValue
from saliency_service.core.registry import Registry


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


@dataclass(frozen=True)
class MetricValue:
    value: float
    curve: np.ndarray
    """The metric's curve (e.g. p(target) after each deletion step); empty when it has none."""


class ScoreMetric(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    higher_is_better: ClassVar[bool]
    params: ClassVar[tuple[ParamSpec, ...]] = ()

    @abstractmethod
    def score(self, request: MetricInput) -> list[MetricValue]:
        """One value per item, all forward passes batched through `request.model.logits`."""


METRICS: Registry[type[ScoreMetric]] = Registry("metric")
