"""The CAM family (METHODS.md §1.2-1.9): slow references that follow the formulas, analytic cases, contrast, chunking.

References take activations and gradients from a forward hook on a private copy of the source
torch module (not the exported artifacts), loop over channels and positions, and resize with an
interpolation matrix built position by position.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.errors import InvalidArgument
from saliency_service.core.images import to_model_input
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.methods.cam import postprocess_cam
from saliency_service.core.methods.score_cam import score_masks
from saliency_service.core.models.export import export_model
from saliency_service.core.models.model import LoadedModel, RuntimeOptions
from saliency_service.core.params import resolve_params
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate

from .conftest import MEAN, STD, ModelCase

GRADIENT_CAMS = ("grad_cam", "grad_cam_plus_plus", "hires_cam", "xgrad_cam", "layer_cam", "eigen_grad_cam")
FORWARD_CAMS = ("score_cam", "ablation_cam")


def _attribute(
    model: LoadedModel,
    method: str,
    x: np.ndarray,
    targets: np.ndarray,
    layer: str | None = None,
    foils: np.ndarray | None = None,
    **params: object,
) -> np.ndarray:
    cls = METHODS.get(method)
    request = MethodInput(
        model=model,
        x=x,
        targets=targets,
        params=resolve_params(cls.params, params, method),
        layer=layer or model.config.default_layer,
        seed=0,
        foils=foils,
    )
    return cls().attribute(request)


def _batch(model: LoadedModel, batch: int, seed: int) -> np.ndarray:
    spec = model.config.input
    return np.random.default_rng(seed).standard_normal((batch, 3, spec.height, spec.width)).astype(np.float32)


# ---- plain references ----


def _interpolation(out: int, size: int) -> np.ndarray:
    """out x size matrix of bilinear weights, PyTorch's align_corners=False convention."""
    matrix = np.zeros((out, size))
    for i in range(out):
        position = max((i + 0.5) * size / out - 0.5, 0.0)
        low = min(int(math.floor(position)), size - 1)
        high = min(low + 1, size - 1)
        matrix[i, low] += 1 - (position - low)
        matrix[i, high] += position - low
    return matrix


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return _interpolation(height, image.shape[0]) @ image @ _interpolation(width, image.shape[1]).T


def _finish(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    cam = np.maximum(cam, 0)
    cam = cam - cam.min()
    cam = cam / (cam.max() + 1e-7)
    return _resize(cam, height, width)


def _objective(logits: torch.Tensor, target: int, foil: int | None) -> torch.Tensor:
    return logits[target] - (logits[foil] if foil is not None else 0)


def _hooked(module: nn.Module, layer: str, x: np.ndarray, target: int, foil: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Activation and gradient of (logit_target - logit_foil) at `layer`, one image, float64."""
    module = copy.deepcopy(module).eval()
    captured: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, __: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["a"] = output

    handle = module.get_submodule(layer).register_forward_hook(keep)
    try:
        _objective(module(torch.from_numpy(x[None]))[0], target, foil).backward()
    finally:
        handle.remove()
    activation = captured["a"]
    assert activation.grad is not None
    return activation[0].detach().numpy().astype(np.float64), activation.grad[0].numpy().astype(np.float64)


def _weighted_sum(weights: list[float] | np.ndarray, activation: np.ndarray) -> np.ndarray:
    cam = np.zeros(activation.shape[1:])
    for k in range(activation.shape[0]):
        cam += weights[k] * activation[k]
    return cam


def _ref_grad_cam_plus_plus(a: np.ndarray, g: np.ndarray, normalize_alpha: bool) -> np.ndarray:
    channels, h, w = a.shape
    weights = []
    for k in range(channels):
        total = a[k].sum()
        alpha = np.zeros((h, w))
        for r in range(h):
            for c in range(w):
                denominator = 2 * g[k, r, c] ** 2 + total * g[k, r, c] ** 3
                alpha[r, c] = g[k, r, c] ** 2 / denominator if denominator != 0 else 0.0
        if normalize_alpha:
            norm = sum(alpha[r, c] for r in range(h) for c in range(w) if g[k, r, c] > 0)
            alpha = alpha / norm if norm != 0 else np.zeros_like(alpha)
        weights.append(sum(alpha[r, c] * max(g[k, r, c], 0.0) for r in range(h) for c in range(w)))
    return _weighted_sum(weights, a)


def _ref_xgrad_cam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    weights = []
    for k in range(a.shape[0]):
        total = a[k].sum()
        weights.append(sum(a[k, r, c] / (total + 1e-7) * g[k, r, c] for r in range(a.shape[1]) for c in range(a.shape[2])))
    return _weighted_sum(weights, a)


def _ref_layer_cam(a: np.ndarray, g: np.ndarray, gamma: float) -> np.ndarray:
    cam = np.zeros(a.shape[1:])
    for k in range(a.shape[0]):
        for r in range(a.shape[1]):
            for c in range(a.shape[2]):
                cam[r, c] += max(g[k, r, c], 0.0) * a[k, r, c]
    if gamma > 0:
        cam = np.maximum(cam, 0)
        cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
        cam = np.tanh(gamma * cam)
    return cam


def _first_component(matrix_chw: np.ndarray, center: bool) -> np.ndarray:
    """Eigen projection, signed so that it correlates positively with the channel sum (METHODS.md §1.6)."""
    channels, h, w = matrix_chw.shape
    rows = matrix_chw.reshape(channels, h * w).T
    matrix = rows - rows.mean(axis=0) if center else rows
    v1 = np.linalg.svd(matrix, full_matrices=False)[2][0]
    projection = matrix @ v1
    if projection @ rows.sum(axis=1) < 0:
        projection = -projection
    return projection.reshape(h, w)


def _reference_map(method: str, a: np.ndarray, g: np.ndarray, **params: object) -> np.ndarray:
    if method == "grad_cam":
        return _weighted_sum([g[k].mean() for k in range(len(a))], a)
    if method == "grad_cam_plus_plus":
        return _ref_grad_cam_plus_plus(a, g, bool(params.get("normalize_alpha", False)))
    if method == "hires_cam":
        return (g * a).sum(axis=0)
    if method == "xgrad_cam":
        return _ref_xgrad_cam(a, g)
    if method == "layer_cam":
        return _ref_layer_cam(a, g, float(params.get("gamma", 0.0)))  # type: ignore[arg-type]
    assert method == "eigen_grad_cam"
    return _first_component(g * a, bool(params.get("center", True)))


GRADIENT_CASES = [
    ("grad_cam_plus_plus", {}),
    ("grad_cam_plus_plus", {"normalize_alpha": True}),
    ("hires_cam", {}),
    ("xgrad_cam", {}),
    ("layer_cam", {}),
    ("layer_cam", {"gamma": 2.0}),
    ("eigen_grad_cam", {}),
    ("eigen_grad_cam", {"center": False}),
]


@pytest.mark.parametrize("layer", ["stem", "features"])
@pytest.mark.parametrize(("method", "params"), GRADIENT_CASES)
def test_gradient_cams_match_plain_references(method: str, params: dict[str, object], layer: str, tiny_cnn: ModelCase) -> None:
    model = tiny_cnn.model
    spec = model.config.input
    x, targets = _batch(model, 2, 31), np.array([1, 3])
    maps = _attribute(model, method, x, targets, layer=layer, **params)
    for item in range(len(x)):
        a, g = _hooked(tiny_cnn.module, layer, x[item], int(targets[item]))
        expected = _finish(_reference_map(method, a, g, **params), spec.height, spec.width)
        assert expected.max() > 0.5, "the reference map must not be empty, or the comparison proves little"
        np.testing.assert_allclose(maps[item], expected, atol=2e-4, err_msg=f"{method} {params} item {item}")


def _layer_output_of(module: nn.Module, layer: str, x: np.ndarray) -> np.ndarray:
    return _hooked(module, layer, x, 0)[0]


def _ref_score_cam(module: nn.Module, layer: str, x: np.ndarray, target: int, foil: int | None, score: str, softmax: bool) -> np.ndarray:
    a = _layer_output_of(module, layer, x)
    _, height, width = x.shape
    scores = []
    for k in range(a.shape[0]):
        mask = _resize(a[k], height, width)
        span = mask.max() - mask.min()
        mask = (mask - mask.min()) / span if span > 0 else np.zeros_like(mask)
        with torch.no_grad():
            logits = module(torch.from_numpy((x * mask[None]).astype(np.float32))[None])[0].double()
        outputs = torch.softmax(logits, dim=0) if score == "probability" else logits
        scores.append(float(_objective(outputs, target, foil)))
    weights = np.exp(np.array(scores) - max(scores)) if softmax else np.array(scores)
    if softmax:
        weights = weights / weights.sum()
    return _weighted_sum(weights, a)


def _zeroing(channel: int) -> Callable[[nn.Module, object, torch.Tensor], torch.Tensor]:
    def hook(_: nn.Module, __: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, channel] = 0
        return output

    return hook


def _ref_ablation_cam(module: nn.Module, layer: str, x: np.ndarray, target: int, foil: int | None, channels: list[int]) -> np.ndarray:
    a = _layer_output_of(module, layer, x)
    module = copy.deepcopy(module).eval()
    with torch.no_grad():
        y = float(_objective(module(torch.from_numpy(x[None]))[0].double(), target, foil))
    weights = [0.0] * a.shape[0]
    for k in channels:
        handle = module.get_submodule(layer).register_forward_hook(_zeroing(k))
        try:
            with torch.no_grad():
                y_k = float(_objective(module(torch.from_numpy(x[None]))[0].double(), target, foil))
        finally:
            handle.remove()
        weights[k] = (y - y_k) / (abs(y) if y != 0 else 1.0)
    return _weighted_sum(weights, a)


SCORE_CASES = [
    {"score": "logit", "channel_softmax": True},
    {"score": "probability", "channel_softmax": True},
    {"score": "logit", "channel_softmax": False},
    {"score": "probability", "channel_softmax": False},
]


@pytest.mark.parametrize("params", SCORE_CASES)
def test_score_cam_matches_plain_reference(params: dict[str, object], tiny_cnn: ModelCase) -> None:
    model = tiny_cnn.model
    spec = model.config.input
    x = _batch(model, 3, 32)
    targets = model.logits(x).argmax(axis=1)
    filled = 0
    for layer in ("stem", "features"):
        maps = _attribute(model, "score_cam", x, targets, layer=layer, **params)
        for item in range(len(x)):
            cam = _ref_score_cam(
                tiny_cnn.module, layer, x[item], int(targets[item]), None, str(params["score"]), bool(params["channel_softmax"])
            )
            expected = _finish(cam, spec.height, spec.width)
            # Raw negative logits as weights make a negative sum over non-negative activations: an empty map, rightly.
            filled += int(expected.max() > 0.5)
            np.testing.assert_allclose(maps[item], expected, atol=2e-4, err_msg=f"{layer} item {item}")
    assert filled >= 4, "most reference maps must be non-empty, or the comparison proves little"


@pytest.mark.parametrize("layer", ["stem", "features"])
def test_ablation_cam_matches_plain_reference(layer: str, tiny_cnn: ModelCase) -> None:
    model = tiny_cnn.model
    spec = model.config.input
    x, targets = _batch(model, 3, 33), np.array([0, 1, 3])
    maps = _attribute(model, "ablation_cam", x, targets, layer=layer)
    channels = model.config.layer(layer).shape[0]
    filled = 0
    for item in range(len(x)):
        cam = _ref_ablation_cam(tiny_cnn.module, layer, x[item], int(targets[item]), None, list(range(channels)))
        expected = _finish(cam, spec.height, spec.width)
        filled += int(expected.max() > 0.5)  # all-negative drops rightly give an empty map
        np.testing.assert_allclose(maps[item], expected, atol=2e-4, err_msg=f"item {item}")
    assert filled >= 2, "most reference maps must be non-empty, or the comparison proves little"


def _ref_ranking(a: np.ndarray) -> list[int]:
    """Channels by descending share of their normalised |A_k| under the normalised uncentred Eigen-CAM map."""
    channels, h, w = a.shape
    rows = a.reshape(channels, h * w).T
    v1 = np.linalg.svd(rows, full_matrices=False)[2][0]
    v1 = -v1 if v1.sum() < 0 else v1
    eigen = np.maximum(rows @ v1, 0).reshape(h, w)
    eigen = (eigen - eigen.min()) / (eigen.max() - eigen.min()) if eigen.max() > eigen.min() else np.zeros_like(eigen)
    overlap = []
    for k in range(channels):
        magnitude = np.abs(a[k])
        magnitude = magnitude - magnitude.min()
        magnitude = magnitude / magnitude.max() if magnitude.max() > 0 else magnitude
        overlap.append((magnitude * eigen).sum() / magnitude.sum() if magnitude.sum() > 0 else 0.0)
    return sorted(range(channels), key=lambda k: -overlap[k])


def test_ablation_cam_channel_ratio_ablates_the_top_ranked_channels(tiny_cnn: ModelCase) -> None:
    model = tiny_cnn.model
    spec = model.config.input
    x, targets = _batch(model, 2, 34), np.array([2, 1])
    maps = _attribute(model, "ablation_cam", x, targets, layer="features", channel_ratio=0.3)
    full = _attribute(model, "ablation_cam", x, targets, layer="features")
    assert not np.allclose(maps, full, atol=1e-3), "ablating 3 of 8 channels should change the map"
    for item in range(len(x)):
        kept = _ref_ranking(_layer_output_of(tiny_cnn.module, "features", x[item]))[: math.ceil(0.3 * 8)]
        cam = _ref_ablation_cam(tiny_cnn.module, "features", x[item], int(targets[item]), None, kept)
        np.testing.assert_allclose(maps[item], _finish(cam, spec.height, spec.width), atol=2e-4)


# ---- analytic cases ----


class GapNet(nn.Module):
    """Conv-Softplus, then global average pooling and a linear head: the gradient at `features` is the same at every position."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Softplus())
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class LogitDifference(nn.Module):
    """Class 0 is net's logit_target - logit_foil (class 1 its negation), so a foil's objective is a plain logit here."""

    def __init__(self, net: nn.Module, target: int, foil: int) -> None:
        super().__init__()
        self.net = net
        self.target = target
        self.foil = foil

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        difference = logits[:, self.target] - logits[:, self.foil]
        return torch.stack([difference, -difference], dim=1)


def _export(module: nn.Module, size: tuple[int, int], repository: Path, name: str, classes: int, layers: list[str]) -> LoadedModel:
    module.eval()
    folder = export_model(
        module, torch.zeros((1, 3, *size)), repository, name, labels=[f"c{i}" for i in range(classes)], layers=layers, mean=MEAN, std=STD
    )
    return LoadedModel.load(folder, RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False))


@pytest.fixture(scope="module")
def gap_net(repository: Path) -> LoadedModel:
    torch.manual_seed(5)
    return _export(GapNet(), (12, 14), repository, "gap-net", 3, ["features"])


@pytest.fixture(scope="module")
def difference_net(repository: Path, tiny_cnn: ModelCase) -> LoadedModel:
    """tiny_cnn's logit 2 minus logit 1 as class 0."""
    module = LogitDifference(copy.deepcopy(tiny_cnn.module), 2, 1)
    return _export(module, (20, 28), repository, "tiny-difference", 2, ["net.stem", "net.features"])


def test_hires_cam_and_xgrad_cam_equal_grad_cam_when_the_gradient_is_spatially_constant(gap_net: LoadedModel) -> None:
    x, targets = _batch(gap_net, 3, 41), np.array([0, 1, 2])
    grad_cam = _attribute(gap_net, "grad_cam", x, targets)
    assert grad_cam.max() > 0.5
    np.testing.assert_allclose(_attribute(gap_net, "hires_cam", x, targets), grad_cam, atol=1e-5)
    # w_k = sum_u (A_ku / sum_v A_kv) g_k = g_k when the gradient g_k is constant (positive activations: no dead channel).
    np.testing.assert_allclose(_attribute(gap_net, "xgrad_cam", x, targets), grad_cam, atol=1e-5)
    # Not an identity for every CAM: LayerCAM drops the negative channel weights, so it differs here.
    assert not np.allclose(_attribute(gap_net, "layer_cam", x, targets), grad_cam, atol=1e-3)


def _linear_weights(linear_net: ModelCase) -> np.ndarray:
    """classes x 3 x H x W: the features layer is the identity, so the gradient there is the head's weight."""
    spec = linear_net.model.config.input
    return linear_net.module.head.weight.detach().numpy().astype(np.float64).reshape(-1, 3, spec.height, spec.width)


def test_linear_model_gradient_cams_are_their_formulas_in_w_and_x(linear_net: ModelCase) -> None:
    """y = W . x + b and A = x, so G = W exactly: every gradient CAM is a closed form in W and x."""
    model = linear_net.model
    spec = model.config.input
    x, targets = _batch(model, 2, 42), np.array([0, 2])
    weights = _linear_weights(linear_net)[targets]
    xs = x.astype(np.float64)
    hires = (weights * xs).sum(axis=1)
    bias = linear_net.module.head.bias.detach().numpy()[targets]
    np.testing.assert_allclose(hires.sum(axis=(1, 2)), model.logits(x)[[0, 1], targets] - bias, rtol=1e-4)  # HiResCAM's faithfulness
    totals = xs.sum(axis=(2, 3), keepdims=True)
    xgrad_weights = (xs / (totals + 1e-7) * weights).sum(axis=(2, 3), keepdims=True)
    expected = {
        "hires_cam": hires,
        "layer_cam": (np.maximum(weights, 0) * xs).sum(axis=1),
        "xgrad_cam": (xgrad_weights * xs).sum(axis=1),
        "grad_cam": (weights.mean(axis=(2, 3), keepdims=True) * xs).sum(axis=1),
    }
    for method, cams in expected.items():
        maps = _attribute(model, method, x, targets)
        for item in range(len(x)):
            np.testing.assert_allclose(maps[item], _finish(cams[item], spec.height, spec.width), atol=1e-5, err_msg=method)


def test_layer_cam_equals_hires_cam_on_non_negative_gradients(linear_net: ModelCase, repository: Path) -> None:
    module = copy.deepcopy(linear_net.module)
    with torch.no_grad():
        module.head.weight.abs_()
    spec = linear_net.model.config.input
    model = _export(module, (spec.height, spec.width), repository, "linear-positive", 3, ["features"])
    x, targets = _batch(model, 3, 43), np.array([0, 1, 2])
    layer_cam = _attribute(model, "layer_cam", x, targets)
    assert layer_cam.max() > 0.5
    np.testing.assert_allclose(layer_cam, _attribute(model, "hires_cam", x, targets), atol=1e-6)
    # ... and differs where the weights have both signs.
    mixed = linear_net.model
    assert not np.allclose(_attribute(mixed, "layer_cam", x, targets), _attribute(mixed, "hires_cam", x, targets), atol=1e-3)


def test_score_cam_on_a_model_linear_in_the_masked_input(linear_net: ModelCase) -> None:
    """A = x at full resolution, so H_k = minmax(x_k) and s_k = W_c . (x * H_k) + b_c exactly."""
    model = linear_net.model
    spec = model.config.input
    x, targets = _batch(model, 2, 44), np.array([1, 2])
    weights = _linear_weights(linear_net)
    bias = linear_net.module.head.bias.detach().numpy().astype(np.float64)
    for softmax in (False, True):
        maps = _attribute(model, "score_cam", x, targets, channel_softmax=softmax)
        for item in range(len(x)):
            xs = x[item].astype(np.float64)
            masks = (xs - xs.min(axis=(1, 2), keepdims=True)) / np.ptp(xs, axis=(1, 2), keepdims=True)
            scores = np.array([(weights[targets[item]] * xs * masks[k]).sum() + bias[targets[item]] for k in range(3)])
            channel_weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum() if softmax else scores
            expected = _finish((channel_weights[:, None, None] * xs).sum(axis=0), spec.height, spec.width)
            np.testing.assert_allclose(maps[item], expected, atol=1e-5)


def test_ablation_cam_on_a_linear_model(linear_net: ModelCase) -> None:
    """Zeroing channel k of A = x removes W_ck . x_k from y: w_k = W_ck . x_k / |y|."""
    model = linear_net.model
    spec = model.config.input
    x, targets = _batch(model, 3, 45), np.array([0, 1, 2])
    weights = _linear_weights(linear_net)
    y = model.logits(x)[np.arange(3), targets]
    maps = _attribute(model, "ablation_cam", x, targets)
    for item in range(len(x)):
        xs = x[item].astype(np.float64)
        drops = (weights[targets[item]] * xs).sum(axis=(1, 2))
        expected = _finish((drops[:, None, None] / abs(y[item]) * xs).sum(axis=0), spec.height, spec.width)
        np.testing.assert_allclose(maps[item], expected, atol=1e-5)


# ---- contrast: a foil explains logit_target - logit_foil ----


@pytest.mark.parametrize("method", GRADIENT_CAMS + FORWARD_CAMS)
def test_foil_gives_the_map_of_the_logit_difference(method: str, tiny_cnn: ModelCase, difference_net: LoadedModel) -> None:
    model = tiny_cnn.model
    x = _batch(model, 2, 51)
    change = 0.0
    for layer in ("stem", "features"):
        contrast = _attribute(model, method, x, np.array([2, 2]), layer=layer, foils=np.array([1, 1]))
        difference = _attribute(difference_net, method, x, np.array([0, 0]), layer=f"net.{layer}")
        np.testing.assert_allclose(contrast, difference, atol=2e-4, err_msg=layer)
        plain = _attribute(model, method, x, np.array([2, 2]), layer=layer)
        change = max(change, float(np.abs(contrast - plain).max()))
    # Not at every layer: Grad-CAM++'s alpha ~ 1/(S g) when S g >> 2 (the stem), which makes its weights nearly class-blind there.
    assert change > 0.05, f"{method}: the foil should change the map"


def test_foil_matches_the_hooked_reference_of_the_difference(tiny_cnn: ModelCase) -> None:
    model = tiny_cnn.model
    spec = model.config.input
    x = _batch(model, 1, 52)
    a, g = _hooked(tiny_cnn.module, "features", x[0], 3, foil=0)
    for method in ("grad_cam", "hires_cam", "layer_cam"):
        maps = _attribute(model, method, x, np.array([3]), layer="features", foils=np.array([0]))
        np.testing.assert_allclose(maps[0], _finish(_reference_map(method, a, g), spec.height, spec.width), atol=2e-4)
    maps = _attribute(model, "ablation_cam", x, np.array([3]), layer="features", foils=np.array([0]))
    expected = _ref_ablation_cam(tiny_cnn.module, "features", x[0], 3, 0, list(range(8)))
    np.testing.assert_allclose(maps[0], _finish(expected, spec.height, spec.width), atol=2e-4)


# ---- chunking and parameters ----


@pytest.mark.parametrize("method", FORWARD_CAMS)
def test_small_max_batch_gives_the_same_maps(method: str, tiny_cnn: ModelCase) -> None:
    """B x K perturbed rows are chunked by max_batch; chunk edges must not mix items or channels."""
    assert tiny_cnn.model.folder is not None
    small = LoadedModel.load(tiny_cnn.model.folder, RuntimeOptions(max_batch=5, threads=1, prefer_cuda=False))
    x, targets = _batch(small, 3, 61), np.array([0, 3, 1])
    np.testing.assert_allclose(
        _attribute(small, method, x, targets, layer="features"), _attribute(tiny_cnn.model, method, x, targets, layer="features"), atol=1e-5
    )


@pytest.mark.parametrize(
    ("method", "params", "reason"),
    [
        ("score_cam", {"score": "softmax"}, "INVALID_PARAMETER"),
        ("ablation_cam", {"channel_ratio": 0.0}, "PARAMETER_OUT_OF_RANGE"),
        ("ablation_cam", {"channel_ratio": 1.5}, "PARAMETER_OUT_OF_RANGE"),
        ("layer_cam", {"gamma": -1.0}, "PARAMETER_OUT_OF_RANGE"),
        ("grad_cam_plus_plus", {"normalize_alpha": 1}, "INVALID_PARAMETER"),
    ],
)
def test_bad_parameters_are_invalid_arguments(method: str, params: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_params(METHODS.get(method).params, params, method)
    assert caught.value.reason == reason


@pytest.mark.parametrize("method", GRADIENT_CAMS[1:] + FORWARD_CAMS)
def test_every_cam_needs_a_layer(method: str, tiny_cnn: ModelCase) -> None:
    cls = METHODS.get(method)
    request = MethodInput(tiny_cnn.model, _batch(tiny_cnn.model, 1, 0), np.array([0]), resolve_params(cls.params, {}, method), None, 0)
    with pytest.raises(InvalidArgument) as caught:
        cls().attribute(request)
    assert caught.value.reason == "LAYER_REQUIRED"
    assert cls.family == "cam" and cls.uses_layer and cls.contrastive


def test_score_cam_scores_constant_channels_like_any_other() -> None:
    """Constant channels (all-zero masks) are scored by one zero-image pass per item: the same weights as
    scoring every channel's masked input one by one. The shipped model's layer2 has such channels."""
    model = LoadedModel.load(EMBEDDED_REPOSITORY / "shapes")
    spec = model.config.input
    x = to_model_input([generate(HELDOUT_SEED_OFFSET + i).image for i in range(3)], spec)
    targets = model.logits(x).argmax(axis=1)
    _, outputs = model.forward(x, ["layer2"])
    activations = torch.from_numpy(outputs["layer2"])
    flat = activations.flatten(2)
    constant = flat.amax(dim=2) == flat.amin(dim=2)
    assert constant.any(dim=1).sum() >= 2, "the test needs items with constant channels"
    maps = _attribute(model, "score_cam", x, targets, layer="layer2")
    masks = score_masks(activations, spec.height, spec.width).float()
    for item in range(len(x)):
        masked = (torch.from_numpy(x[item])[None] * masks[item][:, None]).numpy()
        scores = model.logits(masked)[:, targets[item]].astype(np.float64)
        weights = torch.softmax(torch.from_numpy(scores), dim=0)
        expected = postprocess_cam((weights[:, None, None] * activations[item].double()).sum(dim=0)[None], spec.height, spec.width)[0]
        np.testing.assert_allclose(maps[item], expected, atol=1e-5)


class DuplicateChannels(nn.Module):
    """`features` (a bare convolution) has channel 1 a copy of channel 0 and channel 2 twice it (exactly, in float):
    the three have one min-max normalised activation, so one Score-CAM mask. Channel 3 is minus channel 0: its
    normalised activation is 1 minus theirs, a mask of its own."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            weight, bias = self.features.weight, self.features.bias
            weight[1], bias[1] = weight[0], bias[0]
            weight[2], bias[2] = 2 * weight[0], 2 * bias[0]
            weight[3], bias[3] = -weight[0], -bias[0]
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


def test_score_cam_runs_one_pass_for_channels_with_one_normalised_activation(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(8)
    model = _export(DuplicateChannels(), (10, 12), repository, "duplicate-channels", 3, ["features"])
    spec = model.config.input
    x, targets = _batch(model, 2, 17), np.array([0, 2])
    _, outputs = model.forward(x, ["features"])
    activations = torch.from_numpy(outputs["features"])
    flat = activations.flatten(2)
    assert bool((flat.amax(dim=2) > flat.amin(dim=2)).all()), "no constant channel here: every pass is a distinct mask's"
    rows: list[int] = []
    logits_tensor = model.logits_tensor

    def counting(inputs: torch.Tensor) -> torch.Tensor:
        rows.append(len(inputs))
        return logits_tensor(inputs)

    monkeypatch.setattr(model, "logits_tensor", counting)
    maps = _attribute(model, "score_cam", x, targets)
    assert sum(rows) == 2 * 4, "per item: channels 0, 1 and 2 share one pass; 3, 4 and 5 have one each"
    monkeypatch.undo()
    masks = score_masks(activations, spec.height, spec.width).float()
    for item in range(len(x)):
        masked = (torch.from_numpy(x[item])[None] * masks[item][:, None]).numpy()
        weights = torch.softmax(torch.from_numpy(model.logits(masked)[:, targets[item]].astype(np.float64)), dim=0)
        expected = postprocess_cam((weights[:, None, None] * activations[item].double()).sum(dim=0)[None], spec.height, spec.width)[0]
        assert expected.max() > 0.5
        np.testing.assert_allclose(maps[item], expected, atol=1e-5)
