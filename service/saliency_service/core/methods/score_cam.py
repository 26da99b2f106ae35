"""Gradient-free CAMs that weight channels by extra forward passes (METHODS.md §1.8, §1.9).

Score-CAM (Wang et al., CVPRW 2020, arXiv 1910.01279): each channel, upsampled and min-max
normalised, masks the input; the objective on the masked input weights the channel.
Ablation-CAM (Desai & Ramaswamy, WACV 2020): each channel is set to zero at the layer; the drop of
the objective weights the channel.

Both score perturbed batches with `request.objective_of`, so a foil (target minus foil) works as
for the gradient CAMs, and both run their B x K perturbed rows in chunks of `model.max_batch`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.methods.cam import postprocess_cam, require_layer, safe_divide
from saliency_service.core.methods.eigen_cam import first_component_projection
from saliency_service.core.params import ParamSpec

SCORES = ("logit", "probability")


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def score_masks(activations: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Score-CAM's masks H_k: each channel bilinearly upsampled (align_corners=False) and min-max normalised to [0, 1].

    B x K x h x w -> B x K x height x width, in float32 as the model takes it (and as pytorch-grad-cam makes them).
    A constant channel gives the all-zero mask.
    """
    upsampled = F.interpolate(activations.float(), size=(height, width), mode="bilinear", align_corners=False)
    low = upsampled.amin(dim=(2, 3), keepdim=True)
    high = upsampled.amax(dim=(2, 3), keepdim=True)
    # A constant channel has upsampled - low = 0 exactly, so dividing it by 1 gives its zero mask; the
    # per-channel `where` keeps the full-size work to one subtraction and one division.
    return (upsampled - low) / torch.where(high > low, high - low, 1.0)


@METHODS.register("score_cam")
class ScoreCam(SaliencyMethod):
    """Score-CAM (Wang et al., CVPRW 2020; METHODS.md §1.8).

    For each channel k, the normalised input x is multiplied by the mask H_k (the same mask on every
    colour channel; 0 in normalised space is the dataset mean), and the objective of the masked input
    (the target logit, or with `score` = probability the target's softmax probability; minus the
    foil's with a foil) is s_k. Default weights: softmax of s_k over channels, as in the paper's
    Algorithm 1 and in pytorch-grad-cam. The paper's baseline score f(x_b) is the same for every
    channel, so the channel softmax cancels it and no baseline pass is run. `channel_softmax` = false
    uses s_k directly (the official code, with `score` = probability). The weighted sum uses the
    layer-resolution activations, then the shared CAM post-processing (pytorch-grad-cam; the official
    code sums upsampled activations, which differs only in where the ReLU meets the upsampling).
    """

    description = "Score-CAM: each channel's upsampled activation masks the input; the target score of the masked input weights it."
    family = "cam"
    uses_layer = True
    params = (
        ParamSpec(
            "score",
            "string",
            "logit",
            "What scores a masked input: the target's logit (pytorch-grad-cam) or its softmax probability (the official code).",
            choices=SCORES,
        ),
        ParamSpec(
            "channel_softmax",
            "bool",
            True,
            "Softmax the channel scores over channels (paper, pytorch-grad-cam); false uses the raw scores (official code).",
        ),
    )

    def maps(self, request: MethodInput) -> torch.Tensor:
        layer = require_layer(request, self.name)
        model = request.model
        # The masked batches are made where the model runs and handed to onnxruntime there (on a GPU they
        # never cross to the host); their logits and the channel scores stay there too.
        x = request.input()
        activations = request.activation_tensor(layer)
        batch, channels = activations.shape[:2]
        spec = model.config.input
        probability = request.params["score"] == "probability"

        def score(inputs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
            logits = model.logits_tensor(inputs)
            return request.objective_values(torch.softmax(logits.double(), dim=1) if probability else logits, items)

        # A constant channel's mask is all zero (bilinear upsampling keeps a channel constant or not), so its
        # masked input is the zero image, the same for every such channel of an item: one pass per item scores
        # them all (ReLU layers have many). The mask depends on a channel only through its min-max normalised
        # activation (upsampling commutes with x -> a x + b), so channels of one item whose normalised
        # activations are equal (after a ReLU, say, channels active at one place only) share one pass too;
        # every mask is made from the normalised activation, so equal ones are equal to the bit. The masks are
        # made one chunk at a time, so memory holds max_batch masks, not B x K.
        flat = activations.flatten(2).double()
        low, high = flat.amin(dim=2, keepdim=True), flat.amax(dim=2, keepdim=True)
        live = (high > low)[..., 0]
        rows = torch.nonzero(live.flatten()).flatten()
        row_items = rows // channels
        normalised = ((flat - low) / torch.where(high > low, high - low, 1.0)).flatten(0, 1)[rows]
        distinct, shared = torch.unique(torch.cat([row_items[:, None].double(), normalised], dim=1), dim=0, return_inverse=True)
        distinct_scores = torch.empty(len(distinct), dtype=torch.float64, device=x.device)
        for start, end in _chunks(len(distinct), model.max_batch):
            items = distinct[start:end, 0].long()
            masks = score_masks(distinct[start:end, 1:].reshape(end - start, 1, *activations.shape[2:]), spec.height, spec.width)
            distinct_scores[start:end] = score(x[items].mul_(masks), items)
        scores = torch.zeros(batch * channels, dtype=torch.float64, device=x.device)
        scores[rows] = distinct_scores[shared]
        weights = scores.reshape(batch, channels)
        dead_items = torch.nonzero((~live).any(dim=1)).flatten()
        if len(dead_items):
            blank = torch.zeros(batch, dtype=torch.float64, device=x.device)
            blank[dead_items] = score(x.new_zeros((len(dead_items), *x.shape[1:])), dead_items)
            weights = torch.where(live, weights, blank[:, None])
        if request.params["channel_softmax"]:
            weights = torch.softmax(weights, dim=1)
        maps = (weights[:, :, None, None] * activations.double()).sum(dim=1)
        return postprocess_cam(maps, spec.height, spec.width)


def channels_to_ablate(activations: torch.Tensor, ratio: float) -> torch.Tensor:
    """B x n channel indices, n = ceil(ratio * K): all channels in order when ratio is 1.

    Otherwise (METHODS.md §1.9's `ratio_channels_to_ablate`, ranked in our own way) the channels
    whose mass lies most where the Eigen-CAM map is strong: per channel, the share of its min-max
    normalised |A_k| that falls under the min-max normalised Eigen-CAM map (uncentred, sign-fixed).
    A channel whose activation sits where the first principal component is weak is assumed to
    matter little. pytorch-grad-cam keeps the top and the bottom of its ranking; this keeps the top.
    """
    batch, channels = activations.shape[:2]
    count = max(1, math.ceil(ratio * channels))
    if count >= channels:
        return torch.arange(channels, device=activations.device).repeat(batch, 1)
    eigen = torch.relu(first_component_projection(activations, center=False))
    eigen = eigen - eigen.amin(dim=(1, 2), keepdim=True)
    eigen = safe_divide(eigen, eigen.amax(dim=(1, 2), keepdim=True))
    magnitude = activations.double().abs()
    magnitude = magnitude - magnitude.amin(dim=(2, 3), keepdim=True)
    magnitude = safe_divide(magnitude, magnitude.amax(dim=(2, 3), keepdim=True))
    overlap = safe_divide((magnitude * eigen[:, None]).sum(dim=(2, 3)), magnitude.sum(dim=(2, 3)))
    order = torch.sort(overlap, dim=1, descending=True, stable=True).indices
    return order[:, :count]


@METHODS.register("ablation_cam")
class AblationCam(SaliencyMethod):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020; METHODS.md §1.9).

    w_k = (y - y_k) / |y|: y is the objective (target logit, minus the foil's with a foil) and y_k
    the objective with channel k of the layer set to 0 (the torch program's probe adds -A_k to that
    channel; the paper's ablation value; pytorch-grad-cam uses min(A) - 1e7 on layers whose minimum
    is not exactly 0). The paper divides by y; a positive y only scales the map, which min-max
    removes, but a negative y (likely with a foil) would flip every weight and invert the map, so
    this divides by |y| (by 1 when y = 0). Channels not ablated (`channel_ratio` < 1) get weight 0.
    y and every y_k come from the torch program so their difference carries no ONNX-vs-torch error.
    """

    description = "Ablation-CAM: each channel of the layer is zeroed in turn; the relative drop of the target score weights it."
    family = "cam"
    uses_layer = True
    params = (
        ParamSpec(
            "channel_ratio",
            "float",
            1.0,
            "Share of the layer's channels to ablate (1 = all, one extra forward pass each); the others, "
            "those least covered by the Eigen-CAM map, get weight 0.",
            minimum=0.01,
            maximum=1.0,
        ),
    )

    def maps(self, request: MethodInput) -> torch.Tensor:
        layer = require_layer(request, self.name)
        model = request.model
        x = request.input()
        activations = request.activation_tensor(layer)
        batch, channels = activations.shape[:2]
        chosen = channels_to_ablate(activations, float(request.params["channel_ratio"]))
        # Per item: one row with nothing ablated (y), then one row per chosen channel (y_k).
        per_item = 1 + chosen.shape[1]
        rows = batch * per_item
        scores = torch.empty(rows, dtype=torch.float64, device=x.device)
        for start, end in _chunks(rows, model.max_batch):
            index = torch.arange(start, end, device=x.device)
            items, slot = index // per_item, index % per_item
            delta = torch.zeros((end - start, *activations.shape[1:]), dtype=activations.dtype, device=x.device)
            ablated = (slot > 0).nonzero()[:, 0]
            channel = chosen[items[ablated], slot[ablated] - 1]
            delta[ablated, channel] = -activations[items[ablated], channel]
            scores[start:end] = request.objective_values(model.logits_with_delta(x[items], layer, delta), items)
        table = scores.reshape(batch, per_item)
        y = table[:, :1]
        drops = torch.zeros((batch, channels), dtype=torch.float64, device=x.device)
        drops.scatter_(1, chosen, y - table[:, 1:])
        scale = torch.where(y == 0, torch.ones_like(y), y.abs())
        weights = drops / scale
        maps = (weights[:, :, None, None] * activations.double()).sum(dim=1)
        spec = model.config.input
        return postprocess_cam(maps, spec.height, spec.width)
