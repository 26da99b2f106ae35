"""SmoothGrad, SmoothGrad² and VarGrad as parameters of every gradient method (noise.py, METHODS.md §7.2)."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.methods.noise import NOISE_KINDS, noise_draws
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import resolve_params


def _attribute(model: LoadedModel, method: str, x: np.ndarray, targets: np.ndarray, seed: int = 0, **params: object) -> np.ndarray:
    cls = METHODS.get(method)
    return cls().attribute(MethodInput(model, x, targets, resolve_params(cls.params, params, method), None, seed))


def _batch(model: LoadedModel, batch: int, seed: int) -> np.ndarray:
    spec = model.config.input
    return np.random.default_rng(seed).standard_normal((batch, 3, spec.height, spec.width)).astype(np.float32)


def _linear_weights(linear_net) -> np.ndarray:
    spec = linear_net.model.config.input
    return linear_net.module.head.weight.detach().numpy().reshape(-1, 3, spec.height, spec.width)


# ---- analytic: on a linear model the gradient does not depend on the input ----


@pytest.mark.parametrize("absolute", [True, False])
def test_smoothgrad_of_linear_saliency_is_the_clean_map(absolute: bool, linear_net) -> None:
    model, x, targets = linear_net.model, _batch(linear_net.model, 3, 0), np.array([0, 1, 2])
    clean = _attribute(model, "saliency", x, targets, abs=absolute)
    smooth = _attribute(model, "saliency", x, targets, abs=absolute, noise="smoothgrad", noise_samples=16, noise_sigma=0.3)
    np.testing.assert_allclose(smooth, clean, rtol=1e-6, atol=1e-9)
    squared = _attribute(model, "saliency", x, targets, abs=absolute, noise="smoothgrad_sq", noise_samples=16, noise_sigma=0.3)
    np.testing.assert_allclose(squared, clean.astype(np.float64) ** 2, rtol=1e-5, atol=1e-12)


def test_vargrad_of_linear_saliency_is_zero(linear_net) -> None:
    model, x, targets = linear_net.model, _batch(linear_net.model, 3, 1), np.array([2, 1, 0])
    for absolute in (True, False):
        variance = _attribute(model, "saliency", x, targets, abs=absolute, noise="vargrad", noise_samples=16, noise_sigma=0.3)
        assert np.abs(variance).max() < 1e-12


def test_noise_scale_on_linear_input_x_gradient(linear_net) -> None:
    """Gradient x input of a linear model is linear in x, so the aggregates are known in closed form from the draws."""
    model, x, targets = linear_net.model, _batch(linear_net.model, 2, 2), np.array([1, 2])
    samples, sigma, seed = 12, 0.2, 4
    weights = _linear_weights(linear_net)[targets].astype(np.float64)
    spread = x.reshape(2, -1).max(axis=1) - x.reshape(2, -1).min(axis=1)
    draws = noise_draws(seed, samples, x.shape[1:]).astype(np.float64)
    # per_sample[b, s] = sum_c w (x + sigma * spread_b * z_s)
    per_sample = ((x[:, None] + sigma * spread[:, None, None, None, None] * draws[None]) * weights[:, None]).sum(axis=2)
    common = {"noise_samples": samples, "noise_sigma": sigma}
    smooth = _attribute(model, "input_x_gradient", x, targets, seed=seed, noise="smoothgrad", **common)
    np.testing.assert_allclose(smooth, per_sample.mean(axis=1), rtol=1e-4, atol=1e-5)
    variance = _attribute(model, "input_x_gradient", x, targets, seed=seed, noise="vargrad", **common)
    np.testing.assert_allclose(variance, per_sample.var(axis=1), rtol=1e-3, atol=1e-6)
    assert variance.min() > 0


# ---- reference: a plain loop over noisy copies ----


@pytest.mark.parametrize("kind", [k for k in NOISE_KINDS if k != "none"])
@pytest.mark.parametrize(("method", "params"), [("saliency", {}), ("input_x_gradient", {}), ("integrated_gradients", {"steps": 4})])
def test_noise_equals_a_loop_over_samples(kind: str, method: str, params: dict[str, object], tiny_cnn) -> None:
    model, x, targets = tiny_cnn.model, _batch(tiny_cnn.model, 2, 3), np.array([1, 3])
    samples, sigma, seed = 5, 0.15, 8
    fast = _attribute(model, method, x, targets, seed=seed, noise=kind, noise_samples=samples, noise_sigma=sigma, **params)
    draws = noise_draws(seed, samples, x.shape[1:])
    for item in range(len(x)):
        image = x[item]
        noise_std = sigma * (float(image.max()) - float(image.min()))
        maps = [
            _attribute(
                model, method, (image + noise_std * draws[s])[None].astype(np.float32), targets[item : item + 1], seed=seed, **params
            )[0]
            for s in range(samples)
        ]
        stack = np.stack(maps).astype(np.float64)
        if kind == "smoothgrad":
            expected = sum(stack) / samples
        elif kind == "smoothgrad_sq":
            expected = sum(m * m for m in stack) / samples
        else:
            mean = sum(stack) / samples
            expected = sum((m - mean) ** 2 for m in stack) / samples
        scale = np.abs(expected).max()
        np.testing.assert_allclose(fast[item], expected, rtol=1e-4, atol=1e-5 * scale, err_msg=f"item {item}")


# ---- seeds, batches and a nonlinear model ----


def test_noise_is_reproducible_and_seeded(tiny_cnn) -> None:
    model, x, targets = tiny_cnn.model, _batch(tiny_cnn.model, 3, 4), np.array([0, 1, 2])
    params = {"noise": "smoothgrad", "noise_samples": 6}
    first = _attribute(model, "saliency", x, targets, seed=3, **params)
    np.testing.assert_array_equal(first, _attribute(model, "saliency", x, targets, seed=3, **params))
    other = _attribute(model, "saliency", x, targets, seed=4, **params)
    assert np.abs(other - first).max() > 1e-3 * np.abs(first).max()
    # An item's noise depends on the seed only, not on its place in the batch.
    alone = _attribute(model, "saliency", x[2:], targets[2:], seed=3, **params)
    np.testing.assert_allclose(alone[0], first[2], rtol=1e-5, atol=1e-7)


def test_noise_draws_are_standard_normal_and_their_own_stream() -> None:
    draws = noise_draws(5, 64, (3, 16, 16))
    assert draws.dtype == np.float32 and draws.shape == (64, 3, 16, 16)
    np.testing.assert_array_equal(draws, noise_draws(5, 64, (3, 16, 16)))
    assert abs(float(draws.mean())) < 0.02 and abs(float(draws.std()) - 1) < 0.02
    # Independent of other draws from the same seed (IG's uniform baseline uses default_rng(seed)).
    plain = np.random.default_rng(5)
    for other in (plain.standard_normal(draws.shape, dtype=np.float32), np.random.default_rng(5).random(draws.shape)):
        assert abs(np.corrcoef(draws.ravel(), other.ravel())[0, 1]) < 0.02


def test_smoothing_changes_a_nonlinear_map(tiny_cnn) -> None:
    model, x, targets = tiny_cnn.model, _batch(tiny_cnn.model, 2, 5), np.array([0, 3])
    clean = _attribute(model, "saliency", x, targets, abs=False)
    smooth = _attribute(model, "saliency", x, targets, abs=False, noise="smoothgrad", noise_samples=16, noise_sigma=0.2)
    change = np.linalg.norm(smooth - clean) / np.linalg.norm(clean)
    assert change > 0.1, f"smoothing moved the map by only {change:.3f} of its norm"
    # ... and the change is the noise's doing: sigma = 0 gives back the clean map.
    still = _attribute(model, "saliency", x, targets, abs=False, noise="smoothgrad", noise_samples=3, noise_sigma=0.0)
    np.testing.assert_allclose(still, clean, rtol=1e-6, atol=1e-9)
    variance = _attribute(model, "saliency", x, targets, abs=False, noise="vargrad", noise_samples=16, noise_sigma=0.2)
    assert variance.min() >= 0 and variance.max() > 1e-3 * np.abs(clean).max() ** 2
