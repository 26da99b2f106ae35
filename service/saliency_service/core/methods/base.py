"""The saliency-method contract: one class per method, registered under its wire id.

A method holds no request state: `maps` gets everything it needs in a `MethodInput` and returns one
map per item at the model's input resolution. Resizing to the caller's image size, target resolution
and timing are the engine's job.

Where the model runs on a GPU, a method's tensors stay there: `MethodInput.input`, `activation_tensor`,
`objective` and `objective_values` give them on the model's device, the gradient seam (`LoadedModel`)
hands results back on the device of the input it was given, and `maps` may return a tensor on that
device. `attribute` is the one place a batch of maps crosses to the host, as the float32 array the
engine resizes and encodes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

import numpy as np
import torch

from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import ParamSpec, ParamValue
from saliency_service.core.registry import Registry

Maps: TypeAlias = np.ndarray | torch.Tensor
"""B x H x W maps: a numpy array, or a tensor on any device (the model's, for methods that run in torch)."""
Activation: TypeAlias = np.ndarray | torch.Tensor
"""B x C x h x w layer activations: in host memory, or a tensor on the model's device."""


def on_host(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """`array` as a float32 numpy array in host memory (a tensor is copied off its device here)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float32).numpy()
    return np.asarray(array, dtype=np.float32)


@dataclass(frozen=True)
class MethodInput:
    model: LoadedModel
    x: np.ndarray | torch.Tensor
    """B x C x H x W float32, normalised as the model expects: a numpy array from the engine; a tensor where a
    method hands a batch it made on the device to another (the noise wrapper's noisy copies)."""
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
    activations: Mapping[str, Activation] = field(default_factory=dict)
    """Layer activations of `x` (B x C x h x w) that the engine's prediction pass already computed, for
    `LoadedModel.layer_gradient` to start from; may be empty."""

    def input(self) -> torch.Tensor:
        """`x` as a float32 tensor on the model's device (on the CPU it may share the array's memory: do not write to it)."""
        return torch.as_tensor(self.x, dtype=torch.float32, device=self.model.device)

    def cached_activation(self, layer: str) -> Activation | None:
        """The layer's activation for `x` from the engine's prediction pass, if it kept one for this batch."""
        cached = self.activations.get(layer)
        return cached if cached is not None and len(cached) == len(self.x) else None

    def activation(self, layer: str) -> np.ndarray:
        """The layer's activation for `x` (B x C x h x w) in host memory: from the prediction pass when the engine
        kept it, else from one onnxruntime pass."""
        cached = self.cached_activation(layer)
        if cached is not None:
            return on_host(cached)
        _, outputs = self.model.forward(on_host(self.x), [layer])
        return outputs[layer]

    def activation_tensor(self, layer: str) -> torch.Tensor:
        """`activation` as a float32 tensor on the model's device; an onnxruntime pass writes it there directly."""
        cached = self.cached_activation(layer)
        if cached is not None:
            return torch.as_tensor(cached, dtype=torch.float32, device=self.model.device)
        _, outputs = self.model.forward_tensors(self.input(), [layer])
        return outputs[layer]

    def layer_gradient(self, layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, the layer's activation and the objective's gradient there, on the model's device
        (`LoadedModel.layer_gradient`, starting from the engine's activation when it kept one)."""
        return self.model.layer_gradient(self.input(), self.objective(), layer, self.cached_activation(layer))

    def objective(self) -> torch.Tensor:
        """B x num_classes weights on the model's device: +1 on each item's target logit, -1 on its foil's (the
        objective to differentiate)."""
        device = self.model.device
        weights = torch.zeros((len(self.targets), self.model.config.num_classes), device=device)
        rows = torch.arange(len(self.targets), device=device)
        weights[rows, torch.as_tensor(self.targets, dtype=torch.long, device=device)] = 1.0
        if self.foils is not None:
            weights[rows, torch.as_tensor(self.foils, dtype=torch.long, device=device)] = -1.0
        return weights

    def objective_values(self, logits: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """The objective's value per row of `logits` (N x num_classes), as float64 on their device: the target
        logit, minus the foil's.

        `items` maps each row to its request item (for perturbation batches); default row i is item i.
        """
        device = logits.device
        rows = torch.arange(len(logits), device=device)
        index = rows if items is None else torch.as_tensor(items, dtype=torch.long, device=device)
        values = logits[rows, torch.as_tensor(self.targets, dtype=torch.long, device=device)[index]].double()
        if self.foils is not None:
            values = values - logits[rows, torch.as_tensor(self.foils, dtype=torch.long, device=device)[index]].double()
        return values

    def objective_of(self, logits: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """`objective_values` for host arrays."""
        rows = None if items is None else torch.as_tensor(items)
        values: np.ndarray = self.objective_values(torch.from_numpy(np.asarray(logits)), rows).numpy()
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

    def attribute(self, request: MethodInput) -> np.ndarray:
        """B x H x W float32 maps at the model's input resolution, in host memory: `maps`, taken off the device."""
        return on_host(self.maps(request))

    @abstractmethod
    def maps(self, request: MethodInput) -> Maps:
        """B x H x W maps at the model's input resolution; a method that runs in torch leaves them on the model's device."""


METHODS: Registry[type[SaliencyMethod]] = Registry("method")
