"""Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): the layer's first principal direction, gradient-free;
and Eigen-Grad-CAM (pytorch-grad-cam, no paper): the same projection of gradients x activations.
"""

from __future__ import annotations

import torch

from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.methods.cam import postprocess_cam, require_layer
from saliency_service.core.params import ParamSpec


def first_component_projection(activations: torch.Tensor, center: bool) -> torch.Tensor:
    """Project each item's Z x K activation matrix O on its first right singular vector: B x h x w.

    The SVD's sign is arbitrary, and the ReLU that follows would turn a flipped component into an
    empty map, so the sign is fixed (METHODS.md §1.6): uncentred, sum(v1) >= 0 (Perron-Frobenius
    makes v1 non-negative for non-negative activations); centred, the map correlates positively
    with the channel sum.
    """
    batch, channels, h, w = activations.shape
    # float64: the SVD of near-degenerate spectra is where float32 loses the first component.
    raw = activations.detach().to(torch.float64).reshape(batch, channels, h * w).transpose(1, 2)
    matrix = raw - raw.mean(dim=1, keepdim=True) if center else raw
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    v1 = vh[:, 0, :]
    projection = (matrix @ v1[:, :, None])[:, :, 0]
    if center:
        agreement = (projection * raw.sum(dim=2)).sum(dim=1)
    else:
        agreement = v1.sum(dim=1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(torch.float64)
    maps: torch.Tensor = (projection * sign[:, None]).reshape(batch, h, w)
    return maps


@METHODS.register("eigen_cam")
class EigenCam(SaliencyMethod):
    description = "Eigen-CAM: the layer's activations projected on their first right singular vector; class-agnostic and gradient-free."
    family = "cam"
    uses_layer = True
    contrastive = False
    params = (
        ParamSpec(
            "center",
            "bool",
            False,
            "Subtract each channel's spatial mean before the SVD (pytorch-grad-cam); false is the paper's uncentred SVD.",
        ),
    )

    def maps(self, request: MethodInput) -> torch.Tensor:
        layer = require_layer(request, self.name)
        maps = first_component_projection(request.activation_tensor(layer), bool(request.params["center"]))
        spec = request.model.config.input
        return postprocess_cam(maps, spec.height, spec.width)


@METHODS.register("eigen_grad_cam")
class EigenGradCam(SaliencyMethod):
    """Eigen-Grad-CAM (pytorch-grad-cam's `EigenGradCAM`, no paper; METHODS.md §1.7).

    The first principal component of G * A (gradient of the objective times the activation, per
    channel and position), projected as in Eigen-CAM with Eigen-CAM's sign rules. G * A is signed, but
    both rules still mean "the map correlates positively with sum_k G_k * A_k" (the HiResCAM map):
    with O the Z x K matrix and m = O v1, m . (O 1) = v1' O'O 1 = s1^2 sum(v1), and centring does not
    change the dot product of the zero-mean m. pytorch-grad-cam leaves the sign to the SVD.
    """

    description = "Eigen-Grad-CAM: the first principal component of gradients x activations at the layer; class-sensitive Eigen-CAM."
    family = "cam"
    uses_layer = True
    params = (
        ParamSpec(
            "center",
            "bool",
            True,
            "Subtract each channel's spatial mean before the SVD (true: pytorch-grad-cam's definition, a PCA); false: uncentred SVD.",
        ),
    )

    def maps(self, request: MethodInput) -> torch.Tensor:
        layer = require_layer(request, self.name)
        _, activations, gradients = request.layer_gradient(layer)
        maps = first_component_projection(gradients * activations, bool(request.params["center"]))
        spec = request.model.config.input
        return postprocess_cam(maps, spec.height, spec.width)
