"""The CAM family's fixed pipeline and its gradient CAMs (METHODS.md §0, §1.1-1.5).

Pipeline: activations A and gradients G at the requested layer -> one per-method step,
`cam_weights` -> ReLU(sum_k w_k A_k) -> per-item min-max -> bilinear upsample to the model's input
size. A new CAM overrides `cam_weights` (per channel, B x K x 1 x 1, or per position,
B x K x h x w; `params` are the request's validated parameters), and `cam_map` only where the map
is more than the weighted channel sum (LayerCAM's tanh); gradient-free CAMs (Eigen-CAM, Score-CAM,
Ablation-CAM) reuse `postprocess_cam`.

Methods: Grad-CAM (Selvaraju et al., ICCV 2017), Grad-CAM++ (Chattopadhay et al., WACV 2018),
HiResCAM (Draelos & Carin, arXiv 2011.08891), XGrad-CAM (Fu et al., BMVC 2020), LayerCAM
(Jiang et al., IEEE TIP 2021).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.params import ParamSpec, ParamValue

# pytorch-grad-cam's guard: keeps an all-zero map at zero instead of 0/0.
MINMAX_EPS = 1e-7
# XGrad-CAM's epsilon (METHODS.md §1.4): a dead channel (sum 0) gets a weight of about 0.
XGRAD_EPS = 1e-7


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


def postprocess_cam(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ReLU, per-item min-max (subtract min, divide by max + 1e-7), bilinear upsample (align_corners=False).

    `maps` is B x h x w; returns B x height x width float32 on the same device.
    """
    maps = torch.relu(maps.float())
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    maps = maps / (maps.amax(dim=(1, 2), keepdim=True) + MINMAX_EPS)
    upsampled = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)
    return upsampled[:, 0]


class CamMethod(SaliencyMethod):
    """A CAM that weights the layer's activations using its gradients; subclasses give the weights."""

    family = "cam"
    uses_layer = True

    def maps(self, request: MethodInput) -> torch.Tensor:
        layer = require_layer(request, self.name)
        # One backward pass for the whole batch: items do not interact in eval mode.
        _, activations, gradients = request.layer_gradient(layer)
        maps = self.cam_map(activations, gradients, request.params)
        spec = request.model.config.input
        return postprocess_cam(maps, spec.height, spec.width)

    def cam_map(self, activations: torch.Tensor, gradients: torch.Tensor, params: Mapping[str, ParamValue]) -> torch.Tensor:
        """B x h x w before the ReLU: sum_k w_k A_k."""
        return (self.cam_weights(activations, gradients, params) * activations).sum(dim=1)

    @abstractmethod
    def cam_weights(self, activations: torch.Tensor, gradients: torch.Tensor, params: Mapping[str, ParamValue]) -> torch.Tensor:
        """Weights broadcastable against B x K x h x w: B x K x 1 x 1 per channel, or per position."""


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 where the denominator is 0."""
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(numerator), numerator / torch.where(zero, torch.ones_like(denominator), denominator))


@METHODS.register("grad_cam")
class GradCam(CamMethod):
    description = "Grad-CAM: channel weights are the spatial mean of the target logit's gradient at the layer."

    def cam_weights(self, activations: torch.Tensor, gradients: torch.Tensor, params: Mapping[str, ParamValue]) -> torch.Tensor:
        return gradients.mean(dim=(2, 3), keepdim=True)


@METHODS.register("grad_cam_plus_plus")
class GradCamPlusPlus(CamMethod):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19; METHODS.md §1.2).

    With Y = exp(S) and a piecewise-linear net, alpha_{k,u} = g^2 / (2 g^2 + (sum_v A_{k,v}) g^3),
    and w_k = sum_u alpha_{k,u} ReLU(g_{k,u}). alpha is 0 where the denominator is 0 (which
    includes g = 0). Unlike pytorch-grad-cam, no 1e-6 is added to the denominator: for small
    gradients (g^2 near 1e-6) that constant, not the formula, would decide alpha.
    """

    description = "Grad-CAM++: channel weights sum the positive gradients, each scaled by the closed-form alpha of eq. 19."
    params = (
        ParamSpec(
            "normalize_alpha",
            "bool",
            False,
            "Divide alpha by its sum over the positions with a positive gradient, per channel (the authors' Keras code); "
            "false follows eq. 19 as pytorch-grad-cam does.",
        ),
    )

    def cam_weights(self, activations: torch.Tensor, gradients: torch.Tensor, params: Mapping[str, ParamValue]) -> torch.Tensor:
        g = gradients.double()
        g2 = g * g
        channel_sums = activations.double().sum(dim=(2, 3), keepdim=True)
        alpha = safe_divide(g2, 2 * g2 + channel_sums * g2 * g)
        positive = torch.relu(g)
        if params["normalize_alpha"]:
            alpha = safe_divide(alpha, (alpha * (positive > 0)).sum(dim=(2, 3), keepdim=True))
        return (alpha * positive).sum(dim=(2, 3), keepdim=True).float()


@METHODS.register("hires_cam")
class HiResCam(CamMethod):
    """HiResCAM (Draelos & Carin, arXiv 2011.08891; METHODS.md §1.3): the element-wise product G * A.

    With a flatten-and-linear head the un-ReLU'd map sums to the logit minus the bias; with a GAP
    head (spatially constant gradient) it equals Grad-CAM.
    """

    description = "HiResCAM: the gradient times the activation at every position, summed over channels (no spatial averaging)."

    def cam_weights(self, activations: torch.Tensor, gradients: torch.Tensor, params: Mapping[str, ParamValue]) -> torch.Tensor:
        return gradients


@METHODS.register("xgrad_cam")
class XGradCam(CamMethod):
    """XGrad-CAM (Fu et al., BMVC 2020; METHODS.md §1.4): w_k = sum_u A_{k,u} G_{k,u} / (sum_v A_{k,v} + 1e-7)."""

    description = "XGrad-CAM: channel weights average the gradient over positions, weighted by the channel's normalised activation."

    def cam_weights(self, activations: torch.Tensor, gradients: torch.Tensor, params: Mapping[str, ParamValue]) -> torch.Tensor:
        a = activations.double()
        share = a / (a.sum(dim=(2, 3), keepdim=True) + XGRAD_EPS)
        return (share * gradients.double()).sum(dim=(2, 3), keepdim=True).float()


@METHODS.register("layer_cam")
class LayerCam(CamMethod):
    """LayerCAM (Jiang et al., IEEE TIP 2021; METHODS.md §1.5): ReLU(sum_k ReLU(G_k) * A_k).

    The paper rescales maps from shallow layers by tanh(gamma M / max M), gamma = 2; `gamma` > 0
    applies that to the min-max normalised map (0 = off, as pytorch-grad-cam). Several layers are
    fused by the engine (mean of normalised maps, as pytorch-grad-cam), not by the paper's max.
    """

    description = "LayerCAM: the positive part of the gradient weights the activation at every position; suits shallow layers."
    params = (
        ParamSpec(
            "gamma",
            "float",
            0.0,
            "Shallow-layer rescaling tanh(gamma * map) of the normalised map (the paper uses 2 for shallow layers); 0 turns it off.",
            minimum=0.0,
            maximum=20.0,
        ),
    )

    def cam_weights(self, activations: torch.Tensor, gradients: torch.Tensor, params: Mapping[str, ParamValue]) -> torch.Tensor:
        return torch.relu(gradients)

    def cam_map(self, activations: torch.Tensor, gradients: torch.Tensor, params: Mapping[str, ParamValue]) -> torch.Tensor:
        maps = super().cam_map(activations, gradients, params)
        gamma = float(params["gamma"])
        if gamma == 0:
            return maps
        maps = torch.relu(maps)
        maps = maps - maps.amin(dim=(1, 2), keepdim=True)
        maps = maps / (maps.amax(dim=(1, 2), keepdim=True) + MINMAX_EPS)
        return torch.tanh(gamma * maps)
