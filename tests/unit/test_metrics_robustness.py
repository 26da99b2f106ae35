"""Max-sensitivity, model randomisation, random logit and class sensitivity (METRICS.md §4, §6), the randomised
model copy, and the similarity measures checked against slow reference implementations."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.metrics import METRICS, MetricInput, MetricValue
from saliency_service.core.metrics.similarity import pearson, spearman, ssim
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import resolve_params

from .conftest import ModelCase

Explain = Callable[..., np.ndarray]


def _method(name: str, model: LoadedModel, **params: object) -> Explain:
    """The engine's explain callback for a registered method: same parameters, optional model swap."""
    cls = METHODS.get(name)
    resolved = resolve_params(cls.params, params, name)

    def explain(x: np.ndarray, targets: np.ndarray, other: LoadedModel | None = None) -> np.ndarray:
        return np.asarray(cls().attribute(MethodInput(other or model, x, np.asarray(targets), resolved, None, 0)), dtype=np.float32)

    return explain


def _score(
    model: LoadedModel, metric: str, x: np.ndarray, explain: Explain, targets: np.ndarray, seed: int = 0, **params: object
) -> list[MetricValue]:
    cls = METRICS.get(metric)
    resolved = resolve_params(cls.params, params, metric)
    saliency = explain(x, targets)
    request = MetricInput(model=model, x=x, saliency=saliency, targets=targets, params=resolved, seed=seed, explain=explain)
    return cls().score(request)


def _weights(case: ModelCase) -> np.ndarray:
    weight: np.ndarray = case.module.head.weight.detach().numpy().astype(np.float64)
    return weight.reshape(len(weight), 3, 9, 12)


def _x(seed: int = 0, items: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((items, 3, 9, 12)).astype(np.float32)


def _channel_sum(x: np.ndarray, targets: np.ndarray, other: LoadedModel | None = None) -> np.ndarray:
    """A 'method' that reads neither the model nor the class: the input summed over channels."""
    summed: np.ndarray = x.sum(axis=1)
    return summed


# ---- similarity measures ----


def _reference_ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """SSIM the slow way: every window that fits, sample statistics, scikit-image's constants."""
    data_range = max(a.max(), b.max()) - min(a.min(), b.min())
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for i in range(a.shape[0] - window + 1):
        for j in range(a.shape[1] - window + 1):
            u, v = a[i : i + window, j : j + window].ravel(), b[i : i + window, j : j + window].ravel()
            cov = np.cov(u, v)  # sample (n - 1) covariances
            scores.append(
                ((2 * u.mean() * v.mean() + c1) * (2 * cov[0, 1] + c2))
                / ((u.mean() ** 2 + v.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2))
            )
    return float(np.mean(scores))


def test_similarities_match_reference_implementations() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((16, 13))
    b = 0.5 * a + rng.random((16, 13))
    assert pearson(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    ties = np.round(a * 4)
    assert spearman(ties, b) == pytest.approx(spearmanr(ties.ravel(), b.ravel()).statistic)
    assert ssim(a, b) == pytest.approx(_reference_ssim(a, b), rel=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 1 - a) < 0


def test_constant_maps_follow_one_rule() -> None:
    varying = np.arange(12.0).reshape(3, 4)
    assert pearson(np.zeros((3, 4)), np.zeros((3, 4))) == 1.0
    assert pearson(np.zeros((3, 4)), np.ones((3, 4))) == 0.0
    assert spearman(np.ones((3, 4)), varying) == 0.0
    assert ssim(np.ones((3, 4)), np.ones((3, 4))) == 1.0


# ---- max-sensitivity ----


def test_gradient_of_a_linear_model_is_not_sensitive(linear_net: ModelCase) -> None:
    """The gradient of z = w.x is w whatever x is: every re-explanation is the same map."""
    x = _x(1, 2)
    for abs_ in (True, False):
        values = _score(
            linear_net.model, "max_sensitivity", x, _method("saliency", linear_net.model, abs=abs_), np.array([0, 2]), samples=8
        )
        assert [v.value for v in values] == pytest.approx([0.0, 0.0], abs=1e-6)


def test_gradient_x_input_sensitivity_is_bounded_by_the_noise(linear_net: ModelCase) -> None:
    """Input x gradient on a linear model changes by sum_c w_c delta_c, at most radius * sum_c |w_c| per pixel."""
    x = _x(2)
    radius = 0.2
    (value,) = _score(
        linear_net.model, "max_sensitivity", x, _method("input_x_gradient", linear_net.model), np.array([1]), samples=16, radius=radius
    )
    w = _weights(linear_net)[1]
    bound = np.linalg.norm(radius * np.abs(w).sum(axis=0)) / np.linalg.norm((w * x[0]).sum(axis=0))
    assert 0.0 < value.value <= bound
    (zero_radius,) = _score(
        linear_net.model, "max_sensitivity", x, _method("input_x_gradient", linear_net.model), np.array([1]), samples=4, radius=0.0
    )
    assert zero_radius.value == pytest.approx(0.0, abs=1e-6)


def test_metrics_that_re_explain_refuse_a_request_without_a_method(linear_net: ModelCase) -> None:
    for metric in ("max_sensitivity", "model_randomization", "random_logit", "class_sensitivity"):
        cls = METRICS.get(metric)
        assert cls.needs_method
        request = MetricInput(
            linear_net.model, _x(), np.zeros((1, 9, 12), np.float32), np.array([0]), resolve_params(cls.params, {}, metric), 0
        )
        with pytest.raises(InvalidArgument) as caught:
            cls().score(request)
        assert caught.value.reason == "METHOD_REQUIRED_FOR_METRIC"


# ---- the randomised copy and model randomisation ----


def test_reinitialized_copy_leaves_the_model_alone_and_cascades(linear_net: ModelCase) -> None:
    model = linear_net.model
    x = _x(3, 2)
    before = model.logits(x)
    state = {name: tensor.clone() for name, tensor in model.program.module.state_dict().items()}
    layers = model.parameter_layers()
    assert [layer.rsplit(".", 1)[-1] for layer in layers] == ["features", "head"]
    # No layer re-drawn: the torch forward of the copy agrees with ONNX.
    np.testing.assert_allclose(model.with_reinitialized([], 0).logits(x), before, atol=1e-4)
    head = model.with_reinitialized(layers[-1:], 7)
    both = model.with_reinitialized(layers[::-1], 7)
    assert np.abs(head.logits(x) - before).max() > 1e-2
    head_params = dict(head.program.module.named_parameters())
    for name, tensor in both.program.module.named_parameters():
        # Cascading: the head is drawn the same whether or not the layer below is re-drawn too.
        same = torch.equal(tensor, head_params[name])
        assert same == name.startswith(layers[-1]), name
    # Torch's default init for a linear layer: |w| <= 1 / sqrt(fan_in).
    fan_in = 3 * 9 * 12
    assert float(head_params[f"{layers[-1]}.weight"].abs().max()) <= 1 / np.sqrt(fan_in)
    np.testing.assert_array_equal(model.logits(x), before)
    for name, tensor in model.program.module.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_a_model_independent_map_keeps_correlation_one(linear_net: ModelCase) -> None:
    (value,) = _score(linear_net.model, "model_randomization", _x(4), _channel_sum, np.array([0]))
    np.testing.assert_allclose(value.curve, [1.0, 1.0])
    np.testing.assert_allclose(value.curve_x, [1.0, 2.0])
    assert value.value == pytest.approx(1.0)
    assert list(value.components) == linear_net.model.parameter_layers()[::-1]


def test_a_gradient_map_loses_its_rank_order(linear_net: ModelCase) -> None:
    """Re-drawing the head replaces the gradient w_y by an independent random vector: rank correlation near 0."""
    x = _x(5, 3)
    values = _score(linear_net.model, "model_randomization", x, _method("saliency", linear_net.model), np.array([0, 1, 2]), layers=1)
    for value in values:
        assert len(value.curve) == 1
        # 108 pixels: a correlation of independent maps has a standard error of about 0.1.
        assert abs(value.value) < 0.4


# ---- random logit and class sensitivity ----


def test_random_logit_of_a_class_agnostic_map_is_one(linear_net: ModelCase) -> None:
    (value,) = _score(linear_net.model, "random_logit", _x(6), _channel_sum, np.array([1]))
    assert value.value == pytest.approx(1.0)
    assert value.components["other_class"] in (0.0, 2.0)


def test_random_logit_compares_the_two_class_maps(linear_net: ModelCase) -> None:
    x = _x(7)
    w = _weights(linear_net)
    drawn = set()
    for seed in range(8):
        (value,) = _score(linear_net.model, "random_logit", x, _method("saliency", linear_net.model, abs=False), np.array([0]), seed=seed)
        other = int(value.components["other_class"])
        assert other != 0
        drawn.add(other)
        target_map, other_map = w[0].sum(axis=0), w[other].sum(axis=0)
        expected = _reference_ssim(target_map / np.abs(target_map).max(), other_map / np.abs(other_map).max())
        assert value.value == pytest.approx(expected, abs=1e-5)
    assert drawn == {1, 2}


def test_class_sensitivity_of_linear_gradients(linear_net: ModelCase) -> None:
    """Gradient maps of a linear model are the classes' weights: r = Pearson(w_top, w_bottom)."""
    x = _x(8, 2)
    w = _weights(linear_net)
    logits = linear_net.model.logits(x)
    values = _score(linear_net.model, "class_sensitivity", x, _method("saliency", linear_net.model, abs=False), np.array([0, 0]))
    for item, value in enumerate(values):
        top, bottom = int(logits[item].argmax()), int(logits[item].argmin())
        expected = np.corrcoef(w[top].sum(axis=0).ravel(), w[bottom].sum(axis=0).ravel())[0, 1]
        assert value.value == pytest.approx(expected, abs=1e-5)
        assert value.components["mindspore"] == pytest.approx((1 - expected) / 2, abs=1e-5)
        assert (value.components["top_class"], value.components["bottom_class"]) == (top, bottom)
    (agnostic,) = _score(linear_net.model, "class_sensitivity", x[:1], _channel_sum, np.array([0]))
    assert agnostic.value == pytest.approx(1.0)
