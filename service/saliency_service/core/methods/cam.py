"""The CAM family's fixed pipeline, and Grad-CAM (Selvaraju et al., ICCV 2017).

Pipeline (METHODS.md §0, §1): activations A and gradients G at the requested layer -> one
per-method step, `cam_weights` -> ReLU(sum_k w_k A_k) -> per-item min-max -> bilinear upsample to
the model's input size. A new CAM overrides `cam_weights` only; gradient-free CAMs (Eigen-CAM)
reuse `postprocess_cam`.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
import torch.nn.functional as F

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod

# pytorch-grad-cam's guard: keeps an all-zero map at zero instead of 0/0.
MINMAX_EPS = 1e-7


def require_layer(request: MethodInput, method: str) -> str:
    """The request's layer; layer-based methods cannot guess one at this depth."""
    if request.layer is None:
        raise InvalidArgument(
            "LAYER_REQUIRED",
            f"method '{method}' needs a layer; pass one of the model's declared layers "
            f"({', '.join(spec.name for spec in request.model.config.layers) or 'none declared'})",
            {"method": method},
        )
    return request.layer


def postprocess_cam(maps: torch.Tensor, height: int, width: int) -> np.ndarray:
    """ReLU, per-item min-max (subtract min, divide by max + 1e-7), bilinear upsample (align_corners=False).

    `maps` is B x h x w; returns B x height x width float32.
    """
    maps = torch.relu(maps.float())
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    maps = maps / (maps.amax(dim=(1, 2), keepdim=True) + MINMAX_EPS)
    upsampled = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)
    return upsampled[:, 0].numpy().astype(np.float32, copy=False)


class CamMethod(SaliencyMethod):
    """A CAM that weights the layer's activations using its gradients; subclasses give the weights."""

    family = "cam"
    uses_layer = True

    def attribute(self, request: MethodInput) -> np.ndarray:
        layer = require_layer(request, self.name)
        x = torch.from_numpy(np.ascontiguousarray(request.x, dtype=np.float32))
        # One backward pass for the whole batch: items do not interact in eval mode.
        _, activations, gradients = request.model.layer_gradient(x, request.objective(), layer)
        weights = self.cam_weights(activations, gradients)
        spec = request.model.config.input
        return postprocess_cam((weights * activations).sum(dim=1), spec.height, spec.width)

    @abstractmethod
    def cam_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Weights broadcastable against B x K x h x w: B x K x 1 x 1 per channel, or per position."""


@METHODS.register("grad_cam")
class GradCam(CamMethod):
    description = "Grad-CAM: channel weights are the spatial mean of the target logit's gradient at the layer."

    def cam_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean(dim=(2, 3), keepdim=True)
