"""Analytic answers (a linear model) and slow reference implementations that follow the papers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.methods.gradient import IG_BASELINES, IG_RULES, ig_baseline, path_rule
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import resolve_params


def _attribute(
    model: LoadedModel, method: str, x: np.ndarray, targets: np.ndarray, layer: str | None = None, seed: int = 0, **params: object
) -> np.ndarray:
    cls = METHODS.get(method)
    request = MethodInput(
        model=model,
        x=x,
        targets=targets,
        params=resolve_params(cls.params, params, method),
        layer=(layer or model.config.default_layer) if cls.uses_layer else None,
        seed=seed,
    )
    return cls().attribute(request)


def _batch(model: LoadedModel, batch: int, seed: int) -> np.ndarray:
    spec = model.config.input
    return np.random.default_rng(seed).standard_normal((batch, 3, spec.height, spec.width)).astype(np.float32)


def _linear_weights(linear_net) -> np.ndarray:
    """classes x 3 x H x W: the features layer is the identity, so W is the head's weight."""
    spec = linear_net.model.config.input
    return linear_net.module.head.weight.detach().numpy().reshape(-1, 3, spec.height, spec.width)


# ---- analytic: the linear model y = W . x + b ----


def test_gradient_of_linear_model_is_its_weights(linear_net) -> None:
    x, targets = _batch(linear_net.model, 3, 1), np.array([0, 1, 2])
    weights = _linear_weights(linear_net)[targets]
    signed = _attribute(linear_net.model, "saliency", x, targets, abs=False)
    np.testing.assert_allclose(signed, weights.sum(axis=1), rtol=1e-5, atol=1e-7)
    magnitude = _attribute(linear_net.model, "saliency", x, targets)
    np.testing.assert_allclose(magnitude, np.abs(weights).max(axis=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", IG_RULES)
def test_integrated_gradients_of_linear_model_is_input_times_weights(rule: str, linear_net) -> None:
    x, targets = _batch(linear_net.model, 2, 2), np.array([2, 0])
    expected = (x * _linear_weights(linear_net)[targets]).sum(axis=1)
    steps = 7
    if rule == "riemann_trapezoid":
        # Captum's trapezoid weights sum to 1 - 1/n (METHODS.md §7.1), and the gradient is constant.
        expected = expected * (1 - 1 / steps)
    maps = _attribute(linear_net.model, "integrated_gradients", x, targets, steps=steps, rule=rule)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("baseline", IG_BASELINES)
def test_integrated_gradients_completeness(baseline: str, tiny_cnn) -> None:
    model = tiny_cnn.model
    x = _batch(model, 3, 3)
    start = ig_baseline(baseline, torch.from_numpy(x), model, 9).numpy()
    change = model.logits(x) - model.logits(start)
    # Explain the class whose logit moves most, so a 1% bound is not lost in float noise.
    targets = np.abs(change).argmax(axis=1)
    expected = change[np.arange(len(x)), targets]
    assert np.all(np.abs(expected) > 0.2)
    maps = _attribute(model, "integrated_gradients", x, targets, seed=9, steps=64, rule="gauss_legendre", baseline=baseline)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), expected, rtol=0.01)


@pytest.mark.parametrize("steps", [2, 5, 50])
def test_path_rules_match_the_table(steps: int) -> None:
    n = steps
    k = np.arange(n)
    nodes, gl_weights = np.polynomial.legendre.leggauss(n)
    trapezoid = np.full(n, 1 / n)
    trapezoid[0] = trapezoid[-1] = 1 / (2 * n)
    table = {
        "riemann_left": (k / n, np.full(n, 1 / n)),
        "riemann_right": ((k + 1) / n, np.full(n, 1 / n)),
        "riemann_middle": ((k + 0.5) / n, np.full(n, 1 / n)),
        "riemann_trapezoid": (np.linspace(0, 1, n), trapezoid),
        "gauss_legendre": ((1 + nodes) / 2, gl_weights / 2),
    }
    assert set(table) == set(IG_RULES)
    for rule, (alphas, weights) in table.items():
        got_alphas, got_weights = path_rule(rule, n)
        np.testing.assert_allclose(got_alphas, alphas, atol=1e-15, err_msg=rule)
        np.testing.assert_allclose(got_weights, weights, atol=1e-15, err_msg=rule)
    assert path_rule("riemann_trapezoid", n)[1].sum() == pytest.approx(1 - 1 / n)
    assert path_rule("gauss_legendre", n)[1].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("rule", [r for r in IG_RULES if r.startswith("riemann")])
def test_riemann_rules_need_two_steps(rule: str, linear_net) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _attribute(linear_net.model, "integrated_gradients", _batch(linear_net.model, 1, 0), np.array([0]), steps=1, rule=rule)
    assert caught.value.reason == "TOO_FEW_STEPS"
    assert _attribute(linear_net.model, "integrated_gradients", _batch(linear_net.model, 1, 0), np.array([0]), steps=1).shape[0] == 1


def test_layer_methods_require_a_layer(tiny_cnn) -> None:
    request = MethodInput(tiny_cnn.model, _batch(tiny_cnn.model, 1, 0), np.array([0]), {}, None, 0)
    with pytest.raises(InvalidArgument) as caught:
        METHODS.get("grad_cam")().attribute(request)
    assert caught.value.reason == "LAYER_REQUIRED"


# ---- slow references for the CAM family ----


def _bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with PyTorch's align_corners=False convention, one pixel at a time."""
    h, w = image.shape

    def source(out: int, size: int, i: int) -> tuple[int, int, float]:
        position = max((i + 0.5) * size / out - 0.5, 0.0)
        low = min(int(np.floor(position)), size - 1)
        return low, min(low + 1, size - 1), position - low

    result = np.zeros((height, width))
    for r in range(height):
        r0, r1, fr = source(height, h, r)
        for c in range(width):
            c0, c1, fc = source(width, w, c)
            top = (1 - fc) * image[r0, c0] + fc * image[r0, c1]
            bottom = (1 - fc) * image[r1, c0] + fc * image[r1, c1]
            result[r, c] = (1 - fr) * top + fr * bottom
    return result


def _finish(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    cam = np.maximum(cam, 0)
    cam = cam - cam.min()
    cam = cam / (cam.max() + 1e-7)
    return _bilinear(cam, height, width)


def _activations_and_gradients(module: torch.nn.Module, layer: str, x: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """A hook on a private copy of the source module: the textbook way, one image at a time."""
    module = copy.deepcopy(module).eval()
    captured: dict[str, torch.Tensor] = {}

    def keep(_: torch.nn.Module, __: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["a"] = output

    handle = module.get_submodule(layer).register_forward_hook(keep)
    try:
        module(torch.from_numpy(x[None]))[0, target].backward()
    finally:
        handle.remove()
    activation = captured["a"]
    assert activation.grad is not None
    return activation[0].detach().numpy().astype(np.float64), activation.grad[0].numpy().astype(np.float64)


@pytest.mark.parametrize("layer", ["stem", "features"])
def test_grad_cam_matches_hooked_reference(layer: str, tiny_cnn) -> None:
    model = tiny_cnn.model
    spec = model.config.input
    x, targets = _batch(model, 2, 4), np.array([2, 1])
    maps = _attribute(model, "grad_cam", x, targets, layer=layer)
    for item in range(len(x)):
        activation, gradient = _activations_and_gradients(tiny_cnn.module, layer, x[item], int(targets[item]))
        channel_weights = gradient.mean(axis=(1, 2))
        expected = _finish((channel_weights[:, None, None] * activation).sum(axis=0), spec.height, spec.width)
        np.testing.assert_allclose(maps[item], expected, atol=1e-4)


@pytest.mark.parametrize("center", [False, True])
def test_eigen_cam_matches_numpy_svd(center: bool, tiny_cnn) -> None:
    model = tiny_cnn.model
    spec = model.config.input
    x = _batch(model, 2, 5)
    maps = _attribute(model, "eigen_cam", x, np.array([0, 0]), center=center)
    for item in range(len(x)):
        activation, _ = _activations_and_gradients(tiny_cnn.module, "features", x[item], 0)
        channels, h, w = activation.shape
        rows = activation.reshape(channels, h * w).T
        matrix = rows - rows.mean(axis=0) if center else rows
        v1 = np.linalg.svd(matrix, full_matrices=False)[2][0]
        projection = matrix @ v1
        # The sign rules of METHODS.md §1.6.
        flip = (projection @ rows.sum(axis=1)) < 0 if center else v1.sum() < 0
        projection = -projection if flip else projection
        expected = _finish(projection.reshape(h, w), spec.height, spec.width)
        np.testing.assert_allclose(maps[item], expected, atol=1e-4)
        if not center:
            assert (projection >= -1e-9).all(), "Perron-Frobenius: non-negative activations project non-negatively"
