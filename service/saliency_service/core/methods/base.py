"""The saliency-method contract: one class per method, registered under its wire id.

A method holds no request state: `attribute` gets everything it needs in a `MethodInput` and
returns one map per item at the model's input resolution. Resizing to the caller's image size,
target resolution and timing are the engine's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    """The declared layer this call works at, for methods with `uses_layer`; else None."""
    seed: int
    foils: np.ndarray | None = None
    """B int64 contrast classes, or None: with foils the objective is logit[target] - logit[foil]."""
    baseline: np.ndarray | None = None
    """B x C x H x W reference inputs supplied by the caller (normalised), for methods that take one."""
    layers: tuple[str, ...] = ()
    """Every layer of the request. The engine calls a single-layer method once per layer; a method with
    `multi_layer` gets them all here in one call."""
    activations: Mapping[str, np.ndarray] = field(default_factory=dict)
    """Layer activations of `x` (B x C x h x w) that the engine's prediction pass already computed, for
    `LoadedModel.layer_gradient` to start from; may be empty."""

    def activation(self, layer: str) -> np.ndarray:
        """The layer's activation for `x` (B x C x h x w): from the prediction pass when the engine kept it,
        else from one onnxruntime pass."""
        cached = self.activations.get(layer)
        if cached is not None and len(cached) == len(self.x):
            return cached
        _, outputs = self.model.forward(np.ascontiguousarray(self.x, dtype=np.float32), [layer])
        return outputs[layer]

    def objective(self) -> torch.Tensor:
        """B x num_classes weights: +1 on each item's target logit, -1 on its foil's (the objective to differentiate)."""
        weights = torch.zeros((len(self.targets), self.model.config.num_classes))
        rows = torch.arange(len(self.targets))
        weights[rows, torch.as_tensor(self.targets, dtype=torch.long)] = 1.0
        if self.foils is not None:
            weights[rows, torch.as_tensor(self.foils, dtype=torch.long)] = -1.0
        return weights

    def objective_of(self, logits: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """The objective's value per row of `logits` (N x num_classes): the target logit, minus the foil's.

        `items` maps each row to its request item (for perturbation batches); default row i is item i.
        """
        index = np.arange(len(logits)) if items is None else np.asarray(items)
        values: np.ndarray = logits[np.arange(len(logits)), self.targets[index]].astype(np.float64)
        if self.foils is not None:
            values = values - logits[np.arange(len(logits)), self.foils[index]]
        return values


class SaliencyMethod(ABC):
    name: ClassVar[str]
    """Set by the registry: the id on the wire."""
    description: ClassVar[str]
    family: ClassVar[str]
    """"cam", "gradient", "perturbation" or "relevance"."""
    uses_layer: ClassVar[bool] = False
    layer_optional: ClassVar[bool] = False
    """True: the method works on the input by default and at a declared layer when one is named (ML-Att:
    attribution to the layer's activation, summed over channels, upsampled)."""
    multi_layer: ClassVar[bool] = False
    """True: the method combines several layers itself (gets `MethodInput.layers`); False: the engine
    runs it per layer and averages the normalised maps (ML-Att)."""
    takes_baseline: ClassVar[bool] = False
    """Whether the method uses a caller-supplied reference input (`MethodInput.baseline`)."""
    contrastive: ClassVar[bool] = True
    """Whether a foil class is meaningful: False for class-agnostic methods (Eigen-CAM)."""
    params: ClassVar[tuple[ParamSpec, ...]] = ()

    @abstractmethod
    def attribute(self, request: MethodInput) -> np.ndarray:
        """Return B x H x W float32 maps at the model's input resolution."""


METHODS: Registry[type[SaliencyMethod]] = Registry("method")
