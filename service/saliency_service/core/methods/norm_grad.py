"""NormGrad (Rebuffi, Fong, Ji & Vedaldi, CVPR 2020, arXiv 2004.02866; METHODS.md §3, §10).

A virtual identity layer is inserted after a declared layer; the gradient of its weights sums, over
positions u, a per-position contribution. NormGrad's map is a reduction of that contribution at each u.
With a = A[:, u], g = G[:, u] (channel vectors; G = d objective / d A, the sign of d y_c / d A):

| virtual_layer | contribution at u            | reduction=norm      |
|---------------|------------------------------|---------------------|
| conv1x1       | a (x) g (outer product)      | |a| |g|  (NormGrad) |
| scaling       | a * g (channel-wise)         | |a * g|             |
| conv3x3       | patch3x3(A)_u (x) g          | |patch| |g|         |
| bias          | g                            | |g|                 |

Other reductions: `filter_norm` (L2 of the positive entries; scaling + filter_norm is Selective
NormGrad, |ReLU(a * g)|), `sum` and `max` of the entries. None needs the outer product: for an outer
product u (x) v the positive entries are u+ v+ and u- v-, the sum is (sum u)(sum v), and the max is
attained at a pair of extreme entries. conv3x3 patches use the layer's zero padding of 1.

Each layer's map is upsampled bilinearly (align_corners=False) to the input size and min-max
normalised to [0, 1] (1e-7 guard). With several layers (the method is multi-layer), all layers'
gradients come from one backward pass, and `combine` fuses the normalised maps:
* `product` (default): their product, as the official standalone code's "combi" does;
* `sum`: TorchRay's `weighted_saliency` weighted sum with uniform weights 1/L (its default strategy
  weights depend on per-layer statistics the service does not have).
Which combination produced the paper's tables is unconfirmed (METHODS.md §10). With one layer the
map is that layer's normalised map. No final re-normalisation after combining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.methods.cam import MINMAX_EPS, require_layer
from saliency_service.core.params import ParamSpec

VIRTUAL_LAYERS = ("conv1x1", "scaling", "conv3x3", "bias")
REDUCTIONS = ("norm", "filter_norm", "sum", "max")


def _outer_reduction(u: torch.Tensor, v: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce the per-position outer product u_p v_q^T over (p, q); u is B x P x Z, v is B x Q x Z; returns B x Z."""
    if reduction == "norm":
        product: torch.Tensor = u.norm(dim=1) * v.norm(dim=1)
        return product
    if reduction == "filter_norm":
        up, un, vp, vn = u.clamp(min=0), (-u).clamp(min=0), v.clamp(min=0), (-v).clamp(min=0)
        return torch.sqrt(up.square().sum(1) * vp.square().sum(1) + un.square().sum(1) * vn.square().sum(1))
    if reduction == "sum":
        return u.sum(dim=1) * v.sum(dim=1)
    umax, umin, vmax, vmin = u.amax(1), u.amin(1), v.amax(1), v.amin(1)
    return torch.stack([umax * vmax, umax * vmin, umin * vmax, umin * vmin]).amax(dim=0)


def _entry_reduction(c: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a B x P x Z contribution over its entries P; returns B x Z."""
    if reduction == "norm":
        norm: torch.Tensor = c.norm(dim=1)
        return norm
    if reduction == "filter_norm":
        positive: torch.Tensor = c.clamp(min=0).norm(dim=1)
        return positive
    if reduction == "sum":
        return c.sum(dim=1)
    return c.amax(dim=1)


def norm_grad_map(activations: torch.Tensor, gradients: torch.Tensor, virtual_layer: str, reduction: str) -> torch.Tensor:
    """B x h x w map of the virtual layer's per-position weight-gradient contribution, reduced over its entries."""
    batch, channels, h, w = activations.shape
    a = activations.reshape(batch, channels, h * w)
    g = gradients.reshape(batch, channels, h * w)
    if virtual_layer == "conv1x1":
        out = _outer_reduction(a, g, reduction)
    elif virtual_layer == "conv3x3":
        out = _outer_reduction(F.unfold(activations, kernel_size=3, padding=1), g, reduction)
    elif virtual_layer == "scaling":
        out = _entry_reduction(a * g, reduction)
    else:
        out = _entry_reduction(g, reduction)
    return out.reshape(batch, h, w)


def normalise_upsampled(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear upsample (align_corners=False), then per-item min-max to [0, 1] with the 1e-7 guard."""
    up = F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    up = up - up.amin(dim=(1, 2), keepdim=True)
    return up / (up.amax(dim=(1, 2), keepdim=True) + MINMAX_EPS)


@METHODS.register("norm_grad")
class NormGrad(SaliencyMethod):
    description = (
        "NormGrad (Rebuffi et al., CVPR 2020): per position, the norm of a virtual identity layer's weight gradient, "
        "|activation| x |gradient| for a 1x1 conv; several layers fused by a product (or sum) of normalised maps."
    )
    family = "cam"
    uses_layer = True
    multi_layer = True
    params = (
        ParamSpec(
            "virtual_layer",
            "string",
            "conv1x1",
            "The virtual identity layer: conv1x1 (NormGrad, |a||g|), scaling (a*g per channel), conv3x3 (3x3 patch x g), bias (g).",
            choices=VIRTUAL_LAYERS,
        ),
        ParamSpec(
            "reduction",
            "string",
            "norm",
            "Reduction of the contribution over its entries: norm, filter_norm (norm of the positive part; "
            "scaling + filter_norm is Selective NormGrad), sum, max.",
            choices=REDUCTIONS,
        ),
        ParamSpec(
            "combine",
            "string",
            "product",
            "Fusion of several layers' normalised maps: product (official code) or sum (uniform weighted sum, TorchRay).",
            choices=("product", "sum"),
        ),
    )

    def maps(self, request: MethodInput) -> torch.Tensor:
        layers = tuple(request.layers) or (require_layer(request, self.name),)
        x = request.input()
        spec = request.model.config.input
        virtual_layer, reduction = str(request.params["virtual_layer"]), str(request.params["reduction"])
        # Every layer's gradient from one backward pass per chunk.
        _, activations, gradients = request.model.layers_gradient(x, request.objective(), layers)
        maps = [
            normalise_upsampled(norm_grad_map(activations[layer], gradients[layer], virtual_layer, reduction), spec.height, spec.width)
            for layer in layers
        ]
        if request.params["combine"] == "product":
            combined = torch.stack(maps).prod(dim=0)
        else:
            combined = torch.stack(maps).mean(dim=0)
        return combined.float()
