"""ML-Att: input-space gradient methods at a declared layer, against autograd on the module and Captum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerIntegratedGradients

from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.methods.gradient import ig_baseline, layer_integrated_gradients, path_rule
from saliency_service.core.params import resolve_params

from .conftest import ModelCase


def _x(case: ModelCase, count: int = 3, seed: int = 7) -> np.ndarray:
    spec = case.model.config.input
    return np.random.default_rng(seed).standard_normal((count, 3, spec.height, spec.width)).astype(np.float32)


def _run(case: ModelCase, method: str, x: np.ndarray, targets: np.ndarray, layer: str | None, **params: object) -> np.ndarray:
    cls = METHODS.get(method)
    return cls().attribute(MethodInput(case.model, x, targets, resolve_params(cls.params, params, method), layer, 0))


def _module_layer_gradient(case: ModelCase, x: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A and d logit_target / dA at tiny_cnn's `features`, by autograd on the original module."""
    module = case.module
    with torch.enable_grad():
        activation = module.features(module.stem(torch.from_numpy(x)))
        activation.retain_grad()
        logits = module.head(module.mix(activation).flatten(1))
        logits[torch.arange(len(x)), torch.from_numpy(targets)].sum().backward()
    assert activation.grad is not None
    return activation.detach(), activation.grad


def _upsampled(maps: torch.Tensor, case: ModelCase) -> np.ndarray:
    spec = case.model.config.input
    return F.interpolate(maps[:, None], size=(spec.height, spec.width), mode="bilinear", align_corners=False)[:, 0].numpy()


def test_saliency_and_input_x_gradient_at_a_layer_are_the_layer_gradient(tiny_cnn: ModelCase) -> None:
    x, targets = _x(tiny_cnn), np.array([0, 1, 3])
    activation, gradient = _module_layer_gradient(tiny_cnn, x, targets)
    np.testing.assert_allclose(
        _run(tiny_cnn, "saliency", x, targets, "features"), _upsampled(gradient.abs().amax(dim=1), tiny_cnn), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        _run(tiny_cnn, "saliency", x, targets, "features", abs=False), _upsampled(gradient.sum(dim=1), tiny_cnn), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        _run(tiny_cnn, "input_x_gradient", x, targets, "features"),
        _upsampled((activation * gradient).sum(dim=1), tiny_cnn),
        rtol=1e-4,
        atol=1e-6,
    )
    # At the input the maps are different things altogether.
    assert _run(tiny_cnn, "saliency", x, targets, None).shape == _run(tiny_cnn, "saliency", x, targets, "features").shape


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_layer_integrated_gradients_is_complete(tiny_cnn: ModelCase, baseline: str) -> None:
    """Contributions at the layer sum to f(A) - f(A'), A' the activation of the baseline input."""
    model = tiny_cnn.model
    x, targets = _x(tiny_cnn, 2), np.array([2, 0])
    request = MethodInput(model, x, targets, {"baseline": baseline}, "features", 0)
    inputs = torch.from_numpy(x)
    start = ig_baseline(baseline, inputs, model, 0)
    alphas, weights = path_rule("gauss_legendre", 64)
    contributions = layer_integrated_gradients(model, inputs, start, request.objective(), "features", alphas, weights)
    _, acts = model.forward(np.concatenate([x, start.numpy()]), ["features"])
    a, a_start = torch.from_numpy(acts["features"][:2]), torch.from_numpy(acts["features"][2:])
    end = model.logits_with_delta(inputs, "features", torch.zeros_like(a))[torch.arange(2), targets]
    begin = model.logits_with_delta(inputs, "features", a_start - a)[torch.arange(2), targets]
    totals = contributions.sum(dim=(1, 2, 3))
    np.testing.assert_allclose(totals.numpy(), (end - begin).numpy(), rtol=1e-2, atol=1e-4)
    assert float((end - begin).abs().min()) > 1e-2, "the case must have something to attribute"


def test_layer_integrated_gradients_agrees_with_captum(tiny_cnn: ModelCase) -> None:
    x, targets = _x(tiny_cnn, 3, seed=9), np.array([1, 2, 3])
    ours = _run(tiny_cnn, "integrated_gradients", x, targets, "features", steps=32, rule="riemann_middle")
    captum = LayerIntegratedGradients(tiny_cnn.module, tiny_cnn.module.features)
    theirs = captum.attribute(
        torch.from_numpy(x),
        baselines=torch.zeros_like(torch.from_numpy(x)),
        target=torch.from_numpy(targets),
        n_steps=32,
        method="riemann_middle",
    )
    expected = _upsampled(theirs.detach().sum(dim=1), tiny_cnn)
    for item in range(3):
        assert np.corrcoef(ours[item].ravel(), expected[item].ravel())[0, 1] > 0.9999
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-4 * float(np.abs(expected).max()))
