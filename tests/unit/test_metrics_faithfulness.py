"""ROAD, faithfulness correlation, infidelity and contrastive faithfulness: known answers (METRICS.md §2, §4, §7)."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.metrics import METRICS, MetricInput, MetricValue
from saliency_service.core.metrics.road import linear_impute
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import resolve_params

from .conftest import ModelCase


def _score(
    model: LoadedModel,
    metric: str,
    x: np.ndarray,
    saliency: np.ndarray,
    targets: np.ndarray,
    foils: np.ndarray | None = None,
    seed: int = 0,
    **params: object,
) -> list[MetricValue]:
    cls = METRICS.get(metric)
    resolved = resolve_params(cls.params, params, metric)
    request = MetricInput(model=model, x=x, saliency=saliency, targets=targets, params=resolved, seed=seed, foils=foils)
    return cls().score(request)


def _linear_weights(case: ModelCase) -> np.ndarray:
    """classes x C x H x W: the linear model's weights (its 1x1 `features` conv is the identity)."""
    weight: np.ndarray = case.module.head.weight.detach().numpy().astype(np.float64)
    return weight.reshape(len(weight), 3, 9, 12)


def _linear_input(seed: int = 0, items: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((items, 3, 9, 12)).astype(np.float32)


# ---- faithfulness correlation ----


def test_exact_attribution_of_a_linear_model_correlates_perfectly(linear_net: ModelCase) -> None:
    """z = w.x + b: removing S to zero drops z by sum_S w.x, the map's sum over S, so Pearson(A, D) = 1."""
    weights = _linear_weights(linear_net)
    x = _linear_input(1)
    target = 2
    exact = (weights[target] * x[0]).sum(axis=0)[None].astype(np.float32)
    (value,) = _score(linear_net.model, "faithfulness_correlation", x, exact, np.array([target]), subset_size=10, runs=50, reference="zero")
    assert value.value == pytest.approx(1.0, abs=1e-4)
    # The same relation relative to the "black" reference (the image's minimum).
    relative = (weights[target] * (x[0] - x.min())).sum(axis=0)[None].astype(np.float32)
    (black,) = _score(linear_net.model, "faithfulness_correlation", x, relative, np.array([target]), subset_size=10, runs=50)
    assert black.value == pytest.approx(1.0, abs=1e-4)
    # Against the black reference the zero-baseline map is a worse account of the drops.
    (mismatched,) = _score(linear_net.model, "faithfulness_correlation", x, exact, np.array([target]), subset_size=10, runs=50)
    assert mismatched.value < black.value - 1e-3


def test_gradient_x_input_through_the_method_is_perfect_on_a_linear_model(linear_net: ModelCase) -> None:
    x = _linear_input(2)
    cls = METHODS.get("input_x_gradient")
    maps = cls().attribute(MethodInput(linear_net.model, x, np.array([0]), resolve_params(cls.params, {}, "m"), None, 0))
    (value,) = _score(linear_net.model, "faithfulness_correlation", x, maps, np.array([0]), subset_size=20, runs=40, reference="zero")
    assert value.value == pytest.approx(1.0, abs=1e-4)


def test_random_maps_correlate_near_zero(linear_net: ModelCase) -> None:
    items = 6
    x = _linear_input(3, items)
    maps = np.random.default_rng(9).standard_normal((items, 9, 12)).astype(np.float32)
    values = [
        v.value for v in _score(linear_net.model, "faithfulness_correlation", x, maps, np.zeros(items, np.int64), subset_size=10, runs=200)
    ]
    # Each r has a standard error of about 1/sqrt(200); the mean of six about 0.03.
    assert abs(float(np.mean(values))) < 0.15
    assert max(abs(v) for v in values) < 0.35


def test_subsets_follow_the_seed_and_batch_equals_per_item(tiny_cnn: ModelCase) -> None:
    spec = tiny_cnn.model.config.input
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, spec.height, spec.width)).astype(np.float32)
    maps = rng.random((2, spec.height, spec.width)).astype(np.float32)
    targets = np.array([1, 2])
    for metric, params in (("faithfulness_correlation", {"runs": 30, "subset_size": 40}), ("infidelity", {"samples": 30})):
        batched = _score(tiny_cnn.model, metric, x, maps, targets, seed=4, **params)
        for item in range(2):
            (alone,) = _score(tiny_cnn.model, metric, x[item : item + 1], maps[item : item + 1], targets[item : item + 1], seed=4, **params)
            assert alone.value == pytest.approx(batched[item].value, rel=1e-5, abs=1e-7)
        other = _score(tiny_cnn.model, metric, x, maps, targets, seed=5, **params)
        assert [v.value for v in other] != pytest.approx([v.value for v in batched])


def test_subset_larger_than_the_image_is_refused(linear_net: ModelCase) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _score(
            linear_net.model, "faithfulness_correlation", _linear_input(), np.zeros((1, 9, 12), np.float32), np.array([0]), subset_size=109
        )
    assert caught.value.reason == "PARAMETER_OUT_OF_RANGE"


# ---- infidelity ----


def test_exact_attribution_of_a_linear_model_has_zero_infidelity(linear_net: ModelCase) -> None:
    weights = _linear_weights(linear_net)
    x = _linear_input(4)
    exact = (weights[1] * x[0]).sum(axis=0)[None].astype(np.float32)
    (value,) = _score(linear_net.model, "infidelity", x, exact, np.array([1]), samples=64, patch_size=3, reference="zero", rescale=False)
    assert value.value == pytest.approx(0.0, abs=1e-8)
    assert value.components["beta"] == pytest.approx(1.0, abs=1e-4)
    # Twice the exact map: beta = 1/2 undoes the scale; without it the error is mean((2A - A)^2) > 0.
    (doubled,) = _score(linear_net.model, "infidelity", x, 2 * exact, np.array([1]), samples=64, patch_size=3, reference="zero")
    assert doubled.value == pytest.approx(0.0, abs=1e-8)
    assert doubled.components["beta"] == pytest.approx(0.5, abs=1e-4)
    assert doubled.components["raw"] > 1e-3
    # A map unrelated to the model is far off even after rescaling.
    noise = np.random.default_rng(1).standard_normal((1, 9, 12)).astype(np.float32)
    (bad,) = _score(linear_net.model, "infidelity", x, noise, np.array([1]), samples=64, patch_size=3, reference="zero")
    assert bad.value > 100 * max(doubled.value, 1e-8)


def test_patch_larger_than_the_image_is_refused(linear_net: ModelCase) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _score(linear_net.model, "infidelity", _linear_input(), np.zeros((1, 9, 12), np.float32), np.array([0]), patch_size=10)
    assert caught.value.reason == "PARAMETER_OUT_OF_RANGE"


# ---- ROAD ----


def test_linear_imputation_known_answers() -> None:
    height, width = 12, 15
    rows, cols = np.mgrid[0:height, 0:width]
    ramp = np.stack([0.3 * rows - 0.2 * cols + 1.0, 0.05 * cols, np.full((height, width), 0.4)])
    hole = np.zeros((height, width), dtype=bool)
    hole[3:9, 4:11] = True
    np.testing.assert_allclose(linear_impute(ramp, hole), ramp, atol=1e-12)
    # A constant image is recovered exactly, even at the borders and corners.
    corner = np.zeros((height, width), dtype=bool)
    corner[:3, :3] = True
    np.testing.assert_allclose(linear_impute(ramp[2:], corner), ramp[2:], atol=1e-12)
    # A ramp is not recovered at a corner: the border renormalises the neighbour weights.
    assert np.abs(linear_impute(ramp, corner) - ramp).max() > 0.05
    # The imputed value is the weighted mean of the 8 neighbours: one removed pixel in a random image.
    image = np.random.default_rng(0).random((1, 5, 5))
    single = np.zeros((5, 5), dtype=bool)
    single[2, 2] = True
    patch = image[0, 1:4, 1:4]
    expected = (patch[[0, 1, 1, 2], [1, 0, 2, 1]].sum() / 6) + (patch[[0, 0, 2, 2], [0, 2, 0, 2]].sum() / 12)
    assert linear_impute(image, single)[0, 2, 2] == pytest.approx(expected)


def _region_share_left(order_first_in_region: bool, share: float, pixels: int = 256, region: int = 64) -> float:
    """p when `share` of the pixels are removed: the region's pixels go first (or last) in the order."""
    removed = int(np.floor(share * pixels))
    in_region = min(removed, region) if order_first_in_region else max(0, removed - (pixels - region))
    return 1 - in_region / region


def test_road_region_model_perfect_and_inverted_maps(region_model: ModelCase, region_original: np.ndarray, region_mask: np.ndarray) -> None:
    """Imputed pixels are never exactly the original, so p = share of M left untouched (METRICS.md §1's model)."""
    shares = [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9]
    good = region_mask.astype(np.float32)[None]
    (perfect,) = _score(region_model.model, "road", region_original, good, np.array([0]))
    (inverted,) = _score(region_model.model, "road", region_original, 1 - good, np.array([0]))
    morf = [_region_share_left(True, s) for s in shares]
    lerf = [_region_share_left(False, s) for s in shares]
    np.testing.assert_allclose(perfect.curve, morf + lerf, atol=1e-4)
    np.testing.assert_allclose(perfect.curve_x, shares + shares)
    # Inverting the map swaps the orders.
    np.testing.assert_allclose(inverted.curve, lerf + morf, atol=1e-4)
    assert perfect.components["morf"] < inverted.components["morf"]
    assert perfect.value == pytest.approx((np.mean(lerf) - np.mean(morf)) / 2, abs=1e-4)
    assert inverted.value == pytest.approx(-perfect.value, abs=1e-4)
    assert perfect.components["clean"] == pytest.approx(1.0, abs=1e-4)


def test_road_removing_nothing_is_the_clean_score(tiny_cnn: ModelCase) -> None:
    spec = tiny_cnn.model.config.input
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, spec.height, spec.width)).astype(np.float32)
    maps = rng.random((2, spec.height, spec.width)).astype(np.float32)
    values = _score(tiny_cnn.model, "road", x, maps, np.array([0, 1]), percentages="0,50")
    for value in values:
        assert value.curve[0] == pytest.approx(value.components["clean"], abs=1e-5)
        assert value.curve[2] == pytest.approx(value.components["clean"], abs=1e-5)
    # Seeded noise: the same seed gives the same numbers.
    again = _score(tiny_cnn.model, "road", x, maps, np.array([0, 1]), percentages="0,50")
    assert [v.value for v in again] == [v.value for v in values]


@pytest.mark.parametrize(
    ("text", "reason"),
    [("10,abc", "INVALID_PARAMETER"), ("10,100", "PARAMETER_OUT_OF_RANGE"), ("10,10", "INVALID_PARAMETER"), ("", "INVALID_PARAMETER")],
)
def test_road_bad_percentages_are_refused(text: str, reason: str, linear_net: ModelCase) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _score(linear_net.model, "road", _linear_input(), np.zeros((1, 9, 12), np.float32), np.array([0]), percentages=text)
    assert caught.value.reason == reason


# ---- contrastive faithfulness (RFxG CCS) ----


def test_contrast_collapses_when_the_region_is_removed(
    region_model: ModelCase, region_original: np.ndarray, region_mask: np.ndarray
) -> None:
    """p(present) - p(absent) = 2p - 1, with p the share of M left; the perfect map removes M first."""
    alphas = np.arange(1, 10) / 10
    good = region_mask.astype(np.float32)[None]
    targets, foils = np.array([0]), np.array([1])
    (perfect,) = _score(region_model.model, "contrastive_faithfulness", region_original, good, targets, foils)
    (inverted,) = _score(region_model.model, "contrastive_faithfulness", region_original, 1 - good, targets, foils)
    expected = np.array([2 * _region_share_left(True, a) - 1 for a in alphas])
    np.testing.assert_allclose(perfect.curve, expected, atol=1e-4)
    area = float(np.sum((expected[1:] + expected[:-1]) / 2 * 0.1))
    assert perfect.components["area"] == pytest.approx(area, abs=1e-4)
    assert perfect.value == pytest.approx(area / 0.8, abs=1e-4)
    assert perfect.components["clean"] == pytest.approx(1.0, abs=1e-4)
    assert perfect.value < inverted.value


def test_contrastive_faithfulness_needs_a_foil(linear_net: ModelCase) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _score(linear_net.model, "contrastive_faithfulness", _linear_input(), np.zeros((1, 9, 12), np.float32), np.array([0]))
    assert caught.value.reason == "FOIL_REQUIRED"


def test_bad_maps_are_refused_by_every_new_metric(linear_net: ModelCase) -> None:
    for metric in ("road", "faithfulness_correlation", "infidelity", "contrastive_faithfulness"):
        with pytest.raises(InvalidArgument) as caught:
            _score(linear_net.model, metric, _linear_input(), np.zeros((1, 9, 11), np.float32), np.array([0]), np.array([1]))
        assert caught.value.reason == "SALIENCY_SHAPE_MISMATCH"
