"""The saliency-method contract: one class per method, registered under its wire id.

A method holds no request state: `attribute` gets everything it needs in a `MethodInput` and
returns one map per item at the model's input resolution. Resizing to the caller's image size,
target resolution and timing are the engine's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import ParamSpec, ParamValue
from saliency_service.core.registry import Registry


@dataclass(frozen=True)
class MethodInput:
    model: LoadedModel
    x: np.ndarray
    """B x C x H x W float32, normalised as the model expects."""
    targets: np.ndarray
    """B int64 class indices to explain."""
    params: Mapping[str, ParamValue]
    """Validated against the method's `params`, defaults filled in."""
    layer: str | None
    """A declared layer for methods with `uses_layer`, else None."""
    seed: int

    def objective(self) -> torch.Tensor:
        """B x num_classes weights selecting each item's target logit (the objective to differentiate)."""
        weights = torch.zeros((len(self.targets), self.model.config.num_classes))
        weights[torch.arange(len(self.targets)), torch.as_tensor(self.targets, dtype=torch.long)] = 1.0
        return weights


class SaliencyMethod(ABC):
    name: ClassVar[str]
    """Set by the registry: the id on the wire."""
    description: ClassVar[str]
    family: ClassVar[str]
    """"cam", "gradient" or "perturbation"."""
    uses_layer: ClassVar[bool] = False
    params: ClassVar[tuple[ParamSpec, ...]] = ()

    @abstractmethod
    def attribute(self, request: MethodInput) -> np.ndarray:
        """Return B x H x W float32 maps at the model's input resolution."""


METHODS: Registry[type[SaliencyMethod]] = Registry("method")
