"""Salient Relevance map: context-aware saliency detection on an LRP heatmap (METHODS.md §4).

Li, Tian, Mueller & Chen, "Beyond saliency: understanding convolutional neural networks from saliency
prediction on layer-wise relevance propagation", Image and Vision Computing 2019 (arXiv 1712.08268).

Step 1 is LRP (by default the variant of the authors' notebooks: conv layers LRP-0, dense layers z+ with
positive weights and no bias, stabiliser 1e-9, seeded with the objective's logit). Its |R| per colour
channel, min-max scaled jointly, is read as an RGB image. Step 2 is context-aware (CA) saliency
(Goferman, Zelnik-Manor & Tal, CVPR 2010 / TPAMI 2012) on that image, with the parameters of the paper and
of SMILER's re-implementation: CIE L*a*b* patches, dissimilarity d = d_colour / (1 + 3 d_position),
single-scale saliency 1 - exp(-(49 / patch area) mean of the K = 64 smallest d), four scales with 7/5/3/3
pixel patches at 50% overlap, each compared with patches of the image at r, r/2 and r/4 (below 0.2
skipped), averaged, then weighted by 1 - (normalised distance to the pixels above 0.8 of the maximum).

Choices METHODS.md §10 leaves open, made here: a patch is not its own neighbour; patch positions are
normalised by the larger side of their own (rescaled) image, so positions agree across scales; a heatmap
smaller than `max_side` is not enlarged (enlarging adds no detail and costs the fourth power); the LRP
heatmap is read as sRGB (D65) for the L*a*b* conversion; the face/high-level priors are not used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.methods.lrp import COMPOSITES, composite_rules, input_relevance
from saliency_service.core.methods.rules import LinearRule, RuleSet
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import ParamSpec

NOTEBOOK_RULES = RuleSet(
    conv=LinearRule("epsilon", epsilon=1e-9),
    dense=LinearRule("zplus", epsilon=1e-9, zero_bias=True),
    norm_stabilizer=1e-9,
)
"""LRP as in the SR repository's notebooks (METHODS.md §4 step 1)."""

SCALES = ((1.0, 7), (0.8, 5), (0.5, 3), (0.3, 3))
"""(scale r, patch side in pixels) of the CA multi-scale step."""
POSITION_WEIGHT = 3.0
NEIGHBOURS = 64
ATTENDED_FRACTION = 0.8
MIN_CANDIDATE_SCALE = 0.2
_ROWS_PER_CHUNK = 512

_SRGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """3 x H x W sRGB in [0, 1] -> CIE L*a*b* (D65), 3 x H x W."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,jhw->ihw", _SRGB_TO_XYZ.to(rgb), linear) / _D65_WHITE.to(rgb).view(3, 1, 1)
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp(min=1e-12) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    return torch.stack((116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])))


def _minmax_channels(image: torch.Tensor) -> torch.Tensor:
    low = image.amin(dim=(1, 2), keepdim=True)
    span = image.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (image - low) / torch.where(span > 0, span, 1.0), torch.zeros_like(image))


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def _patches(image: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Patches (L x 3*side^2) at stride side // 2, their centres normalised by the larger image side (L x 2), grid shape."""
    stride = max(1, side // 2)
    height, width = image.shape[-2:]
    rows = (height - side) // stride + 1
    cols = (width - side) // stride + 1
    vectors = F.unfold(image[None], kernel_size=side, stride=stride)[0].T
    centre_r = torch.arange(rows, dtype=image.dtype) * stride + (side - 1) / 2
    centre_c = torch.arange(cols, dtype=image.dtype) * stride + (side - 1) / 2
    grid = torch.stack(torch.meshgrid(centre_r, centre_c, indexing="ij"), dim=-1).reshape(-1, 2)
    return vectors, grid / max(height, width), (rows, cols)


def _scaled(image: torch.Tensor, scale: float, side: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    return _resize(image, max(side, round(height * scale)), max(side, round(width * scale)))


def single_scale_saliency(image: torch.Tensor, scale: float, side: int) -> torch.Tensor | None:
    """S^r on the patch grid of `image` at `scale` (Goferman et al. eqs. 1-2 with SMILER's 49/area factor).

    None when the image is so small at this scale that a patch has no other patch to compare with.
    """
    query_image = _scaled(image, scale, side)
    query, query_pos, grid = _patches(query_image, side)
    candidates, candidate_pos = [query], [query_pos]
    for factor in (2.0, 4.0):
        if scale / factor >= MIN_CANDIDATE_SCALE - 1e-9:
            vectors, positions, _ = _patches(_scaled(image, scale / factor, side), side)
            candidates.append(vectors)
            candidate_pos.append(positions)
    pool, pool_pos = torch.cat(candidates), torch.cat(candidate_pos)
    if len(pool) < 2:
        return None
    count = min(NEIGHBOURS, len(pool) - 1)
    values = torch.empty(len(query), dtype=image.dtype)
    for start in range(0, len(query), _ROWS_PER_CHUNK):
        stop = min(len(query), start + _ROWS_PER_CHUNK)
        position = torch.cdist(query_pos[start:stop], pool_pos)
        dissimilarity = torch.cdist(query[start:stop], pool).div_(position.mul_(POSITION_WEIGHT).add_(1))
        # A patch is not its own neighbour.
        own = torch.arange(start, stop)
        dissimilarity[own - start, own] = float("inf")
        nearest = torch.topk(dissimilarity, count, dim=1, largest=False).values
        values[start:stop] = nearest.mean(dim=1)
    return (1 - torch.exp(-(49.0 / side**2) * values)).reshape(grid)


def context_aware_saliency(rgb: torch.Tensor, max_side: int) -> torch.Tensor:
    """CA saliency (METHODS.md §4 step 2) of a 3 x H x W image in [0, 1]; H x W in [0, 1]."""
    height, width = rgb.shape[-2:]
    factor = min(1.0, max_side / max(height, width))
    work_h, work_w = max(1, round(height * factor)), max(1, round(width * factor))
    lab = _minmax_channels(rgb_to_lab(_resize(rgb, work_h, work_w).clamp(0, 1)))
    grids = [single_scale_saliency(lab, scale, side) for scale, side in SCALES]
    maps = [_resize(grid[None], work_h, work_w)[0] for grid in grids if grid is not None]
    if not maps:
        return torch.zeros((height, width), dtype=rgb.dtype)
    mean = torch.stack(maps).mean(dim=0)
    peak = float(mean.max())
    if peak <= 0:
        return torch.zeros((height, width), dtype=rgb.dtype)
    attended = (mean > ATTENDED_FRACTION * peak).numpy()
    distance = ndimage.distance_transform_edt(~attended)
    if distance.max() > 0:
        distance = distance / distance.max()
    weighted = mean * (1 - torch.from_numpy(distance).to(mean.dtype))
    return _resize(weighted[None], height, width)[0]


def relevance_image(relevance: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W relevance -> |R| per channel, min-max scaled jointly over the channels of each item."""
    magnitude = relevance.abs()
    flat = magnitude.reshape(len(magnitude), -1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1, 1) - low).clamp(min=1e-12)
    return (magnitude - low) / span


def sr_rules(composite: str, model: LoadedModel) -> RuleSet:
    return NOTEBOOK_RULES if composite == "notebook" else composite_rules(composite, model)


@METHODS.register("salient_relevance")
class SalientRelevance(SaliencyMethod):
    description = (
        "Salient Relevance (Li et al. 2019): context-aware saliency (Goferman et al.) of the LRP heatmap |R| "
        "read as an RGB image; highlights the distinctive, compact parts of the relevance. Values in [0, 1]."
    )
    family = "relevance"
    params = (
        ParamSpec(
            "composite",
            "string",
            "notebook",
            "LRP for step 1: notebook (the SR repository's: conv LRP-0, dense z+ without bias) or a Zennit composite as in method lrp.",
            choices=("notebook", *COMPOSITES),
        ),
        ParamSpec(
            "max_side",
            "int",
            250,
            "A heatmap whose longest side exceeds this many pixels is shrunk to it before CA saliency (Goferman et al. "
            "use 250); smaller heatmaps keep their size. The cost grows with the fourth power of the side.",
            minimum=16,
            maximum=400,
        ),
    )

    def maps(self, request: MethodInput) -> np.ndarray:
        rules = sr_rules(str(request.params["composite"]), request.model)
        x = request.input()
        objective = request.objective()
        # One item per pass: LRP-0's near-zero denominators amplify the last-bit differences that batched
        # kernels give, and CA's top-K and attention threshold are discontinuous, so a map must not depend
        # on its batch neighbours. CA saliency costs far more than these passes.
        relevance = torch.cat([input_relevance(request.model, x[i : i + 1], objective[i : i + 1], rules, True) for i in range(len(x))])
        images = relevance_image(relevance)
        side = int(request.params["max_side"])
        # Context-aware saliency's distance transform runs on the host (scipy), so its maps are made there.
        maps = [context_aware_saliency(image.cpu(), side).float().numpy() for image in images]
        return np.stack(maps).astype(np.float32)
