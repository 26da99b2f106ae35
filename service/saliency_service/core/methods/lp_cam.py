"""LP-CAM, Local Prototype CAM (Chen et al., CVPR 2023, arXiv 2303.10334; METHODS.md §5, §10).

Offline, once per model and layer (`build_prototypes`, CLI `saliency-service lp-cam-prototypes`):
for each class c, the unpooled local features f_u (channel vectors at the layer) of the images
labelled c are split by the image's CAM for c (max-normalised, `select_threshold` 0.1) into a
foreground and a background pool; each pool is clustered by k-means with cosine distance (K = 12).
Foreground centres p whose class probability softmax(head(p))_c > `class_threshold` (0.9) are c's
class prototypes P_c (if none passes, the most probable centre: the code would crash); background
centres with probability in (`context_low`, `context_high`) = (0.05, 0.9) are c's context prototypes
Q_c. The prototypes live in the model's folder as `lp_cam_<layer>.npz`.

At request time, no backward pass: fg(u) = mean_{p in P_c} cos(f_u, p), ctx(u) = mean_{q in Q_c} cos(f_u, q),
LP(u) = ReLU(fg - ctx), or LP = fg when Q_c is empty (as the code does); bilinear upsample
(align_corners=False); divide by the max when it is positive.

Choices against the paper's code (METHODS.md §5 gives only the code):
* "head(p)" is the network above the layer applied to a feature map equal to p at every position
  (run through the layer probe), so it needs no classifier weights; for a GAP + linear head it is
  W p + b exactly, bias included.
* The CAM that splits the pools is Grad-CAM at the same layer (the ordinary CAM, up to scale, for a
  GAP + linear head), ReLU'd and divided by its max, taken at the feature grid (the code upsamples and
  resizes back).
* K-means: centres are the means of their members' raw features (as kmeans_pytorch's cosine mode),
  assignment by cosine similarity, seeded random initial centres, iterated until the assignment no
  longer changes (at most `max_iter`) instead of kmeans_pytorch's loose tol = 5.
* Test-time scales {0.5, 1, 1.5, 2} are not used: a served model has a fixed input size. The
  horizontal flip is kept (`flip`, features of the image plus the flipped-back features of its flip).
* Contrast (target vs foil): the foil's class prototypes take the place of the target's context
  prototypes, LP = ReLU(fg_target - fg_foil): positions that look more like the target's prototypes
  than like the foil's.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saliency_service.core.errors import FailedPrecondition, InvalidArgument
from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.methods.cam import require_layer
from saliency_service.core.methods.cf_cam import normalise_by_max
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import ParamSpec

FILE_FORMAT_VERSION = 1
COSINE_EPS = 1e-12


def prototype_file(folder: Path, layer: str) -> Path:
    """Where a model's LP-CAM prototypes for `layer` live: `<model folder>/lp_cam_<layer>.npz`."""
    return folder / f"lp_cam_{layer}.npz"


@dataclass(frozen=True)
class LpCamPrototypes:
    """Class and context prototypes of one model at one layer."""

    layer: str
    prototypes: np.ndarray
    """P x K float32 feature vectors."""
    classes: np.ndarray
    """P int64: the class each prototype belongs to."""
    context: np.ndarray
    """P bool: True for a context (background) prototype, False for a class prototype."""

    def of_class(self, cls: int, context: bool) -> np.ndarray:
        selected: np.ndarray = self.prototypes[(self.classes == cls) & (self.context == context)]
        return selected

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            version=np.array(FILE_FORMAT_VERSION, dtype=np.int64),
            layer=np.array(self.layer),
            prototypes=self.prototypes.astype(np.float32),
            classes=self.classes.astype(np.int64),
            context=self.context.astype(bool),
        )


def _missing(model: LoadedModel, layer: str, path: Path | None, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        "LP_CAM_PROTOTYPES_MISSING",
        f"model '{model.name}' has no usable LP-CAM prototypes for layer '{layer}' ({why}); build them with "
        f"`saliency-service lp-cam-prototypes --model {model.name} --layer {layer}` (or "
        f"saliency_service.core.methods.lp_cam.build_prototypes) and reload the model",
        {"model": model.name, "layer": layer, "path": str(path) if path else ""},
    )


def load_prototypes(model: LoadedModel, layer: str) -> LpCamPrototypes:
    """Read and validate `lp_cam_<layer>.npz` in the model's folder (allow_pickle=False)."""
    spec = model.config.layer(layer)
    if model.folder is None:
        raise _missing(model, layer, None, "the model has no folder")
    path = prototype_file(model.folder, layer)
    if not path.is_file():
        raise _missing(model, layer, path, f"{path} does not exist")

    def invalid(problem: str) -> FailedPrecondition:
        return FailedPrecondition(
            "LP_CAM_PROTOTYPES_INVALID",
            f"{path} is not a valid LP-CAM prototype file for model '{model.name}' layer '{layer}': {problem}; rebuild it with "
            f"`saliency-service lp-cam-prototypes --model {model.name} --layer {layer}`",
            {"model": model.name, "layer": layer, "path": str(path)},
        )

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("version", "layer", "prototypes", "classes", "context")}
    except (OSError, ValueError, KeyError) as exc:
        raise invalid(f"cannot read it ({exc})") from None
    prototypes, classes, context = arrays["prototypes"], arrays["classes"], arrays["context"]
    if int(arrays["version"]) != FILE_FORMAT_VERSION:
        raise invalid(f"format version {int(arrays['version'])}, expected {FILE_FORMAT_VERSION}")
    if str(arrays["layer"]) != layer:
        raise invalid(f"it was built for layer '{arrays['layer']}'")
    if prototypes.ndim != 2 or prototypes.shape[1] != spec.shape[0] or not np.issubdtype(prototypes.dtype, np.floating):
        raise invalid(f"prototypes have shape {prototypes.shape} ({prototypes.dtype}), expected P x {spec.shape[0]} floats")
    if classes.shape != (len(prototypes),) or context.shape != (len(prototypes),) or context.dtype != bool:
        raise invalid("classes and context must hold one entry per prototype")
    if not np.issubdtype(classes.dtype, np.integer) or not np.isfinite(prototypes).all():
        raise invalid("classes must be integers and prototypes finite")
    if len(classes) and (classes.min() < 0 or classes.max() >= model.config.num_classes):
        raise invalid(f"class indices outside [0, {model.config.num_classes})")
    lacking = [model.config.labels[c] for c in range(model.config.num_classes) if not np.any((classes == c) & ~context)]
    if lacking:
        raise invalid(f"no class prototype for {', '.join(lacking)}")
    return LpCamPrototypes(layer, prototypes.astype(np.float32), classes.astype(np.int64), context)


# Loaded prototypes per model object and layer, keyed by the file's identity so a rebuilt file is re-read.
_CACHE: weakref.WeakKeyDictionary[LoadedModel, dict[str, tuple[tuple[int, int], LpCamPrototypes]]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def cached_prototypes(model: LoadedModel, layer: str) -> LpCamPrototypes:
    """`load_prototypes`, cached per model object; a changed file (mtime or size) is loaded again."""
    path = prototype_file(model.folder, layer) if model.folder is not None else None
    try:
        stat = path.stat() if path is not None else None
    except OSError:
        stat = None
    if stat is None:
        return load_prototypes(model, layer)
    key = (stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        entry = _CACHE.get(model, {}).get(layer)
    if entry is not None and entry[0] == key:
        return entry[1]
    prototypes = load_prototypes(model, layer)
    with _CACHE_LOCK:
        _CACHE.setdefault(model, {})[layer] = (key, prototypes)
    return prototypes


# ---- offline building ----


def _unit(vectors: np.ndarray) -> np.ndarray:
    normalised: np.ndarray = vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + COSINE_EPS)
    return normalised


def cosine_kmeans(points: np.ndarray, k: int, seed: int, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """K-means with cosine similarity: returns (k' x D centres, N assignments), k' = min(k, N).

    Initial centres: k distinct points drawn with `seed`. Each step assigns every point to the centre
    of highest cosine similarity, then moves each centre to the mean of its members' raw vectors (a
    centre that loses all its members stays). Stops when no assignment changes.
    """
    points = np.asarray(points, dtype=np.float64)
    k = min(k, len(points))
    if k <= 0:
        return np.zeros((0, points.shape[1])), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    centres = points[rng.choice(len(points), size=k, replace=False)].copy()
    unit_points = _unit(points)
    assignment = np.full(len(points), -1, dtype=np.int64)
    for _ in range(max_iter):
        new = np.argmax(unit_points @ _unit(centres).T, axis=1)
        if np.array_equal(new, assignment):
            break
        assignment = new
        for cluster in range(k):
            members = points[assignment == cluster]
            if len(members):
                centres[cluster] = members.mean(axis=0)
    return centres, assignment


def _chunks(n: int, step: int) -> list[slice]:
    return [slice(start, start + step) for start in range(0, n, step)]


def _class_cams(model: LoadedModel, x: np.ndarray, labels: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (N x K x h x w) and each image's Grad-CAM for its label, ReLU'd and divided by its max (N x h x w)."""
    features, cams = [], []
    for part in _chunks(len(x), model.max_batch):
        weights = torch.zeros((len(x[part]), model.config.num_classes))
        weights[torch.arange(len(x[part])), torch.from_numpy(labels[part])] = 1.0
        _, act, grad = model.layer_gradient(torch.from_numpy(np.ascontiguousarray(x[part], dtype=np.float32)), weights, layer)
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1)).double()
        peak = cam.amax(dim=(1, 2), keepdim=True)
        cams.append(torch.where(peak > 0, cam / torch.where(peak > 0, peak, 1.0), cam).numpy())
        features.append(act.double().numpy())
    return np.concatenate(features), np.concatenate(cams)


def head_probabilities(model: LoadedModel, layer: str, vectors: np.ndarray) -> np.ndarray:
    """softmax(head(p)) for each K-vector p: the network above `layer` run on a map equal to p at every position (P x classes)."""
    spec = model.config.input
    x0 = np.zeros((1, spec.channels, spec.height, spec.width), dtype=np.float32)
    _, base = model.forward(x0, [layer])
    target = torch.from_numpy(np.asarray(vectors, dtype=np.float32))[:, :, None, None].expand(-1, *model.config.layer(layer).shape)
    delta = target - torch.from_numpy(base[layer])
    logits = model.logits_with_delta(torch.zeros((len(vectors), *x0.shape[1:])), layer, delta)
    probabilities: np.ndarray = torch.softmax(logits.double(), dim=1).numpy()
    return probabilities


def build_prototypes(
    model: LoadedModel,
    images: np.ndarray,
    layer: str,
    k: int = 12,
    *,
    labels: np.ndarray | None = None,
    select_threshold: float = 0.1,
    class_threshold: float = 0.9,
    context_low: float = 0.05,
    context_high: float = 0.9,
    seed: int = 0,
    max_iter: int = 100,
) -> LpCamPrototypes:
    """LP-CAM prototypes of `model` at `layer` from normalised N x C x H x W `images` (METHODS.md §5, offline part).

    `labels` are the images' classes (default: the model's predictions). Every class needs at least one
    image with some CAM above `select_threshold`; otherwise InvalidArgument says which class lacks data.
    """
    model.config.layer(layer)
    x = np.ascontiguousarray(images, dtype=np.float32)
    if k < 1:
        raise InvalidArgument("INVALID_PARAMETER", f"k must be >= 1, got {k}", {"parameter": "k"})
    if labels is None:
        labels = np.concatenate([model.logits(x[part]).argmax(axis=1) for part in _chunks(len(x), model.max_batch)])
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(x),) or (len(labels) and (labels.min() < 0 or labels.max() >= model.config.num_classes)):
        raise InvalidArgument("INVALID_LABELS", f"need one label in [0, {model.config.num_classes}) per image", {"images": len(x)})
    features, cams = _class_cams(model, x, labels, layer)
    channels = features.shape[1]
    local = features.transpose(0, 2, 3, 1)  # N x h x w x K: one row per position
    kept, kept_classes, kept_context = [], [], []
    for cls in range(model.config.num_classes):
        mine = labels == cls
        foreground = local[mine][cams[mine] > select_threshold].reshape(-1, channels)
        background = local[mine][cams[mine] <= select_threshold].reshape(-1, channels)
        if len(foreground) == 0:
            raise InvalidArgument(
                "NO_FOREGROUND_FEATURES",
                f"no image of class '{model.config.labels[cls]}' has CAM > {select_threshold} at layer '{layer}'; add images of that class",
                {"class": model.config.labels[cls]},
            )
        centres, _ = cosine_kmeans(foreground, k, seed + 2 * cls, max_iter)
        probability = head_probabilities(model, layer, centres)[:, cls]
        chosen = probability > class_threshold
        if not chosen.any():
            chosen = probability == probability.max()
        kept.append(centres[chosen])
        kept_classes.append(np.full(int(chosen.sum()), cls))
        kept_context.append(np.zeros(int(chosen.sum()), dtype=bool))
        if len(background):
            centres, _ = cosine_kmeans(background, k, seed + 2 * cls + 1, max_iter)
            probability = head_probabilities(model, layer, centres)[:, cls]
            chosen = (probability > context_low) & (probability < context_high)
            kept.append(centres[chosen])
            kept_classes.append(np.full(int(chosen.sum()), cls))
            kept_context.append(np.ones(int(chosen.sum()), dtype=bool))
    return LpCamPrototypes(
        layer, np.concatenate(kept).astype(np.float32), np.concatenate(kept_classes).astype(np.int64), np.concatenate(kept_context)
    )


# ---- the method ----


def mean_cosine(features: torch.Tensor, prototypes: np.ndarray) -> torch.Tensor:
    """mean_p cos(f_u, p) over the P x K `prototypes`, for one item's K x h x w features: h x w."""
    unit_features = features / (features.norm(dim=0, keepdim=True) + COSINE_EPS)
    unit_prototypes = torch.from_numpy(_unit(prototypes.astype(np.float64)))
    return torch.einsum("khw,pk->hw", unit_features, unit_prototypes) / len(prototypes)


def lp_cam_map(features: torch.Tensor, target_prototypes: np.ndarray, subtracted: np.ndarray) -> torch.Tensor:
    """LP(u) = ReLU(fg - ctx) with ctx from `subtracted`; fg alone (no ReLU) when `subtracted` is empty. h x w."""
    foreground = mean_cosine(features, target_prototypes)
    if len(subtracted) == 0:
        return foreground
    return torch.relu(foreground - mean_cosine(features, subtracted))


@METHODS.register("lp_cam")
class LpCam(SaliencyMethod):
    description = (
        "LP-CAM (Chen et al., CVPR 2023): cosine similarity of local features to the class's k-means prototypes minus that to "
        "its context prototypes; needs prototypes built once per model (`saliency-service lp-cam-prototypes`)."
    )
    family = "cam"
    uses_layer = True
    params = (
        ParamSpec("flip", "bool", True, "Add the features of the horizontally flipped image (flipped back), as the paper's inference."),
        ParamSpec("context", "bool", True, "Subtract the similarity to the class's context prototypes (false: class prototypes alone)."),
    )

    def maps(self, request: MethodInput) -> np.ndarray:
        layer = require_layer(request, self.name)
        prototypes = cached_prototypes(request.model, layer)
        x = np.ascontiguousarray(request.x, dtype=np.float32)
        features = torch.from_numpy(request.activation(layer)).double()
        if request.params["flip"]:
            _, flipped = request.model.forward(np.ascontiguousarray(x[..., ::-1]), [layer])
            features = features + torch.from_numpy(flipped[layer]).double().flip(-1)
        maps = []
        for item, target in enumerate(request.targets):
            if request.foils is not None:
                subtracted = prototypes.of_class(int(request.foils[item]), context=False)
            elif request.params["context"]:
                subtracted = prototypes.of_class(int(target), context=True)
            else:
                subtracted = prototypes.prototypes[:0]
            maps.append(lp_cam_map(features[item], prototypes.of_class(int(target), context=False), subtracted))
        spec = request.model.config.input
        # LP is already ReLU'd when something is subtracted; without, the code keeps fg's sign.
        return normalise_by_max(torch.stack(maps), spec.height, spec.width, relu=False)
