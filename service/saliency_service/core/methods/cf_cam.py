"""CF-CAM, Cluster Filter Class Activation Mapping (He, Pan & Yao, arXiv 2504.00060, 2025; METHODS.md §2, §10).

Per item, at one layer with activations A and gradients G (K channels, Z = h*w positions):

1. Tier 1: channels whose activation map has an L2 norm at or above the `important_percentile`
   (75) of all channels' norms keep the Grad-CAM weight w_k = mean_u G_{k,u}.
2. Tier 2: the other channels' flattened activation maps are clustered with DBSCAN (Euclidean).
   eps defaults to the `eps_percentile` (25) of all off-diagonal pairwise distances, floored at 1e-5;
   min_samples defaults to max(2, int(0.05 * #channels clustered)). Noise channels (label -1) are
   dropped: no weight, and left out of the map.
3. Each cluster's mean gradient map is filtered with a kernel the size of the map: a spatial Gaussian
   (`sigma_spatial`, feature-map pixels) times, for `filter="bilateral"`, the range term
   exp(-(g - mean g)^2 / (2 sigma_range^2)) evaluated at the kernel's own positions; normalised to sum
   to 1 (+1e-6 guard) and applied as a correlation with zero "same" padding. Every member's weight is
   the spatial mean of the filtered map.
4. `weighting="softmax"` (the code): w = softmax over the kept channels; M = ReLU(sum_k w_k A_k);
   bilinear upsample (align_corners=False); divide by the max when it is positive.

Where paper and code disagree (the paper body was not available; METHODS.md §10):
* The paper says "Gaussian filter", the code a bilateral-style kernel. Default: the code's kernel
  (`filter="bilateral"`); `filter="gaussian"` drops the range term. For logit gradients (|g| << 0.1)
  the two agree.
* The code centres its kernel at (h/2, w/2), which for an even map size is one pixel off the origin
  that "same" padding uses, so its filter also shifts the map by a pixel. Here the Gaussian is centred
  at the padding origin ((h-1)//2, (w-1)//2), so `sigma_spatial = 0` is the identity filter.
* The softmax of raw logit-gradient means is nearly uniform, so the default map tends to the mean of
  the kept activation maps. This is what the code does and is kept (METHODS.md §2.6 says flag, not fix);
  `weighting="linear"` uses the weights as they are (the earlier, GAP-weighted line of this work).
* With fewer than two channels left for tier 2 there are no pairwise distances; they count as noise.
* The code's `noise_level` has no effect on the map and is not offered. Contrast (target vs foil) is
  the gradient of logit[target] - logit[foil], as for every gradient CAM.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.methods.cam import require_layer
from saliency_service.core.params import ParamSpec

EPS_FLOOR = 1e-5
KERNEL_GUARD = 1e-6
NOISE = -1


def dbscan(points: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels (Ester et al. 1996) for N x D points under the Euclidean metric; -1 marks noise."""
    return dbscan_on_distances(pairwise_distances(points), eps, min_samples)


def dbscan_on_distances(distances: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels from an N x N distance matrix; -1 marks noise.

    A point is core when at least `min_samples` points (itself included) lie within distance <= eps.
    Clusters grow from core points in index order, and a border point joins the first cluster that
    reaches it, so labels are deterministic (the same convention as scikit-learn's DBSCAN).
    """
    n = len(distances)
    labels = np.full(n, NOISE, dtype=np.int64)
    neighbours = distances <= eps
    core = neighbours.sum(axis=1) >= min_samples
    cluster = 0
    for start in range(n):
        if labels[start] != NOISE or not core[start]:
            continue
        labels[start] = cluster
        queue = deque([start])
        while queue:
            point = queue.popleft()
            if not core[point]:
                continue
            for other in np.flatnonzero(neighbours[point]):
                if labels[other] == NOISE:
                    labels[other] = cluster
                    if core[other]:
                        queue.append(int(other))
        cluster += 1
    return labels


def pairwise_distances(points: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of N x D `points`, from differences (not the Gram trick, whose
    rounding would move points across an eps taken from these same distances)."""
    rows = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    distances: np.ndarray = cdist(rows, rows)
    return distances


def automatic_eps(points: np.ndarray, percentile: float) -> float:
    """The `percentile` of all off-diagonal pairwise distances (both orders, as the code counts them), floored at 1e-5."""
    return eps_from_distances(pairwise_distances(points), percentile)


def eps_from_distances(distances: np.ndarray, percentile: float) -> float:
    off_diagonal = distances[~np.eye(len(distances), dtype=bool)]
    return max(float(np.percentile(off_diagonal, percentile)), EPS_FLOOR)


def filter_kernel(gradient: torch.Tensor, sigma_spatial: float, sigma_range: float | None) -> torch.Tensor:
    """The h x w kernel for one cluster's mean gradient map `gradient` (h x w); sums to ~1.

    sigma_range None: spatial Gaussian only. sigma_spatial 0: a unit impulse at the padding origin.
    """
    h, w = gradient.shape
    rows = torch.arange(h, dtype=gradient.dtype) - (h - 1) // 2
    cols = torch.arange(w, dtype=gradient.dtype) - (w - 1) // 2
    radius2 = rows[:, None] ** 2 + cols[None, :] ** 2
    if sigma_spatial == 0:
        spatial = (radius2 == 0).to(gradient.dtype)
    else:
        spatial = torch.exp(-radius2 / (2.0 * sigma_spatial**2))
    kernel = spatial
    if sigma_range is not None:
        kernel = kernel * torch.exp(-((gradient - gradient.mean()) ** 2) / (2.0 * sigma_range**2))
    return kernel / (kernel.sum() + KERNEL_GUARD)


def cluster_labels(activations: np.ndarray, important_percentile: float, eps: float, eps_percentile: float, min_samples: int) -> np.ndarray:
    """Per channel of one item's K x Z activation matrix: -2 important (tier 1), -1 noise, >= 0 its cluster."""
    norms = np.linalg.norm(activations.astype(np.float64), axis=1)
    important = norms >= np.percentile(norms, important_percentile)
    labels = np.full(len(activations), -2, dtype=np.int64)
    remaining = np.flatnonzero(~important)
    if len(remaining) < 2:
        labels[remaining] = NOISE
        return labels
    distances = pairwise_distances(activations[remaining])
    radius = eps if eps > 0 else eps_from_distances(distances, eps_percentile)
    samples = min_samples if min_samples > 0 else max(2, int(0.05 * len(remaining)))
    labels[remaining] = dbscan_on_distances(distances, radius, samples)
    return labels


def cf_cam_map(
    activations: torch.Tensor,
    gradients: torch.Tensor,
    *,
    important_percentile: float = 75.0,
    eps: float = 0.0,
    eps_percentile: float = 25.0,
    min_samples: int = 0,
    sigma_spatial: float = 5.0,
    sigma_range: float | None = 0.1,
    weighting: str = "softmax",
) -> torch.Tensor:
    """One item's CF-CAM map at the layer's resolution (h x w, before ReLU) from its K x h x w A and G."""
    channels, h, w = activations.shape
    labels = cluster_labels(activations.reshape(channels, h * w).numpy(), important_percentile, eps, eps_percentile, min_samples)
    weights = torch.zeros(channels, dtype=gradients.dtype)
    important = torch.from_numpy(labels == -2)
    weights[important] = gradients[important].mean(dim=(1, 2))
    clusters = [np.flatnonzero(labels == cluster) for cluster in range(int(labels.max()) + 1)]
    if clusters:
        means = torch.stack([gradients[torch.from_numpy(members)].mean(dim=0) for members in clusters])
        kernels = torch.stack([filter_kernel(mean, sigma_spatial, sigma_range) for mean in means])
        # "Same" zero padding, origin at ((h-1)//2, (w-1)//2); one grouped correlation filters every cluster's map with its own kernel.
        padded = F.pad(means[None], ((w - 1) // 2, w // 2, (h - 1) // 2, h // 2))
        filtered = F.conv2d(padded, kernels[:, None], groups=len(clusters))[0]
        for members, cluster_map in zip(clusters, filtered, strict=True):
            weights[torch.from_numpy(members)] = cluster_map.mean()
    kept = torch.from_numpy(labels != NOISE)
    kept_weights = torch.softmax(weights[kept], dim=0) if weighting == "softmax" else weights[kept]
    return (kept_weights[:, None, None] * activations[kept]).sum(dim=0)


@METHODS.register("cf_cam")
class CfCam(SaliencyMethod):
    description = (
        "CF-CAM (He et al. 2025): Grad-CAM weights for high-norm channels; the rest clustered by DBSCAN on their activation maps, "
        "noise channels dropped, each cluster weighted by its filtered mean gradient; softmax over the kept channels."
    )
    family = "cam"
    uses_layer = True
    params = (
        ParamSpec(
            "important_percentile",
            "float",
            75.0,
            "Channels whose activation-map L2 norm is at or above this percentile keep their own Grad-CAM weight (tier 1).",
            minimum=0.0,
            maximum=100.0,
        ),
        ParamSpec(
            "eps",
            "float",
            0.0,
            "DBSCAN neighbourhood radius on flattened activation maps; 0 = automatic (eps_percentile of the pairwise distances).",
            minimum=0.0,
        ),
        ParamSpec(
            "eps_percentile",
            "float",
            25.0,
            "Percentile of pairwise channel distances used as eps when eps = 0.",
            minimum=0.0,
            maximum=100.0,
        ),
        ParamSpec(
            "min_samples",
            "int",
            0,
            "DBSCAN core-point count (the point itself included); 0 = automatic, max(2, 5% of the channels clustered).",
            minimum=0,
            maximum=100_000,
        ),
        ParamSpec(
            "sigma_spatial",
            "float",
            5.0,
            "Spatial sigma of the cluster gradient filter, in feature-map pixels; 0 leaves the gradients unfiltered.",
            minimum=0.0,
            maximum=1000.0,
        ),
        ParamSpec("sigma_range", "float", 0.1, "Range sigma of the bilateral term (filter = bilateral).", minimum=1e-6, maximum=1e6),
        ParamSpec(
            "filter",
            "string",
            "bilateral",
            "bilateral: the official code's Gaussian x range kernel; gaussian: the paper's wording, spatial Gaussian only.",
            choices=("bilateral", "gaussian"),
        ),
        ParamSpec(
            "weighting",
            "string",
            "softmax",
            "softmax: softmax of the channel weights over the kept channels (the code); linear: the weights as they are.",
            choices=("softmax", "linear"),
        ),
    )

    def maps(self, request: MethodInput) -> np.ndarray:
        layer = require_layer(request, self.name)
        params = request.params
        # The backward pass runs where the model does; DBSCAN needs the layer's tensors in host memory.
        _, activations, gradients = (tensor.cpu() for tensor in request.layer_gradient(layer))
        sigma_range = float(params["sigma_range"]) if params["filter"] == "bilateral" else None
        # DBSCAN is per item (a clustering of that item's channels); the backward pass was batched.
        maps = torch.stack(
            [
                cf_cam_map(
                    activations[item].double(),
                    gradients[item].double(),
                    important_percentile=float(params["important_percentile"]),
                    eps=float(params["eps"]),
                    eps_percentile=float(params["eps_percentile"]),
                    min_samples=int(params["min_samples"]),
                    sigma_spatial=float(params["sigma_spatial"]),
                    sigma_range=sigma_range,
                    weighting=str(params["weighting"]),
                )
                for item in range(len(activations))
            ]
        )
        return normalise_by_max(maps, request.model.config.input.height, request.model.config.input.width)


def normalise_by_max(maps: torch.Tensor, height: int, width: int, relu: bool = True) -> np.ndarray:
    """CF-CAM's and LP-CAM's post-processing: ReLU (optional), bilinear upsample (align_corners=False), divide by the max where positive."""
    maps = torch.relu(maps) if relu else maps
    upsampled = F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    peak = upsampled.amax(dim=(1, 2), keepdim=True)
    normalised = torch.where(peak > 0, upsampled / torch.where(peak > 0, peak, 1.0), upsampled)
    return normalised.numpy().astype(np.float32, copy=False)
