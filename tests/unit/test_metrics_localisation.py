"""Localisation (METRICS.md §3, §8) and complexity (§4) metrics, and the `random` baseline method.

Known answers from the spec (a perfect map, an inverted map, a uniform map, a random map's expectation)
and small maps whose values are worked out by hand in the comments.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import pytest

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.metrics import METRICS, MetricInput, MetricValue
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import resolve_params

# Map-only metrics and the random method never touch the model; a None model proves it (any use raises).
NO_MODEL = cast(LoadedModel, None)

MASK_METRICS = ("pointing_game", "energy_pointing_game", "relevance_mass", "relevance_rank", "foreground_index", "locality_index")
MAP_METRICS = ("sparseness", "complexity", "diffusion_index")


def _score(metric: str, saliency: np.ndarray, masks: np.ndarray | None = None, **params: object) -> list[MetricValue]:
    """Score B x H x W maps (and masks) by `metric` with `params` over its defaults."""
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.ndim == 2:
        saliency = saliency[None]
        masks = None if masks is None else np.asarray(masks)[None]
    cls = METRICS.get(metric)
    batch, height, width = saliency.shape
    request = MetricInput(
        model=NO_MODEL,
        x=np.zeros((batch, 3, height, width), np.float32),
        saliency=saliency,
        targets=np.zeros(batch, np.int64),
        params=resolve_params(cls.params, params, metric),
        seed=0,
        masks=None if masks is None else np.asarray(masks, dtype=bool),
    )
    return cls().score(request)


def _one(metric: str, saliency: np.ndarray, mask: np.ndarray | None = None, **params: object) -> MetricValue:
    (value,) = _score(metric, saliency, mask, **params)
    return value


def _random_maps(images: int, height: int, width: int, seed: int = 0, distribution: str = "uniform") -> np.ndarray:
    """Maps from the registered `random` method on random images (the same images whatever the seed)."""
    x = np.random.default_rng(1000).standard_normal((images, 3, height, width)).astype(np.float32)
    cls = METHODS.get("random")
    request = MethodInput(
        model=NO_MODEL,
        x=x,
        targets=np.zeros(images, np.int64),
        params=resolve_params(cls.params, {"distribution": distribution}, "random"),
        layer=None,
        seed=seed,
    )
    return cls().attribute(request)


def _square_mask(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


# A 32 x 32 image with an 8 x 16 object: |S| / N = 128 / 1024 = 1/8.
SIZE = 32
OBJECT = np.zeros((SIZE, SIZE), dtype=bool)
OBJECT[10:18, 6:22] = True


# ---- a perfect map and an inverted map ----


@pytest.mark.parametrize(
    ("metric", "best"),
    [
        ("pointing_game", 1.0),
        ("energy_pointing_game", 1.0),
        ("relevance_mass", 1.0),
        ("relevance_rank", 1.0),
        # FI's maximum is N / |M'|: with no dilation M' = S, so 1024 / 128.
        ("foreground_index", 8.0),
    ],
)
def test_the_mask_itself_scores_the_best_value(metric: str, best: float) -> None:
    params = {"dilation_px": 0} if metric == "foreground_index" else {}
    assert _one(metric, OBJECT, OBJECT, **params).value == pytest.approx(best)


@pytest.mark.parametrize("metric", ["pointing_game", "energy_pointing_game", "relevance_mass", "relevance_rank", "foreground_index"])
def test_the_inverted_mask_scores_zero(metric: str) -> None:
    # No tolerance, dilation or box: every metric looks at S itself, where the inverted map is 0.
    params = {"pointing_game": {"tolerance_px": 0}, "energy_pointing_game": {"region": "mask"}, "foreground_index": {"dilation_px": 0}}
    assert _one(metric, ~OBJECT, OBJECT, **params.get(metric, {})).value == 0.0


def test_foreground_index_of_the_dilated_mask_is_n_over_its_area() -> None:
    # PoseIG's 5 x 5 max-pool grows the 8 x 16 box by 2 px on every side: 12 x 20 = 240 pixels.
    value = _one("foreground_index", OBJECT, OBJECT)
    assert value.components["area_share"] == pytest.approx(240 / 1024)
    assert value.components["mass_share"] == pytest.approx(1.0)
    assert value.value == pytest.approx(1024 / 240)


def test_a_one_hot_map_at_the_centroid_is_the_best_locality() -> None:
    centre = np.zeros((SIZE, SIZE), np.float32)
    centre[13, 13] = 1.0  # OBJECT's centroid is (13.5, 13.5); the four nearest pixels tie
    far = np.zeros((SIZE, SIZE), np.float32)
    far[0, 31] = 1.0
    assert _one("locality_index", centre, OBJECT).value > 1.0 > _one("locality_index", far, OBJECT).value


# ---- the chance level: a uniform map and random maps ----


def test_a_uniform_map_scores_the_area_shares() -> None:
    uniform = np.ones((SIZE, SIZE), np.float32)
    assert _one("relevance_mass", uniform, OBJECT).value == pytest.approx(1 / 8)
    assert _one("energy_pointing_game", uniform, OBJECT, region="mask").value == pytest.approx(1 / 8)
    # Every pixel ties for the maximum, and 1/8 of them are in S.
    assert _one("pointing_game", uniform, OBJECT, tolerance_px=0).value == pytest.approx(1 / 8)
    assert _one("relevance_rank", uniform, OBJECT).value == pytest.approx(1 / 8)
    assert _one("foreground_index", uniform, OBJECT).value == pytest.approx(1.0)
    assert _one("locality_index", uniform, OBJECT).value == pytest.approx(1.0)
    assert _one("diffusion_index", uniform).value == pytest.approx(100.0)
    assert _one("sparseness", uniform).value == pytest.approx(0.0, abs=1e-12)
    assert _one("complexity", uniform).value == pytest.approx(math.log(SIZE * SIZE))


def test_random_maps_score_the_area_share_on_average() -> None:
    """i.i.d. pixels are exchangeable, so the expectations are exact: E[PG at tolerance 0] = E[RMA] = E[RRA] = f,
    E[FI] = E[LI] = 1. Tolerances are four standard errors over 400 images (f = 1/8, N = 1024):
    - PG is Bernoulli(f): sd sqrt(f(1-f)/400) = 0.0165 -> 0.066.
    - RMA ~ a ratio of uniform sums: per image Var ≈ f(1-f)·(1/12)/(N·(1/2)²) = f(1-f)/(3N), sd 0.0060; over 400: 0.0003 -> 0.0012.
    - RRA: the overlap of a random K-subset with S, K = |S| = 128, is hypergeometric:
      Var = K·f·(1-f)·(N-K)/(N-1) = 12.26, sd/K = 0.0274; over 400: 0.00137 -> 0.0055.
    - FI with no dilation is RMA·N/|S| = 8·RMA: 0.0012·8 -> 0.0096.
    - LI = Σ u·w / Σ u with w = h·N/Σh (mean 1): per image Var ≈ Σ(w-1)²/(3N²); sigma = 0.5·sqrt(128/π) = 3.2 px,
      Σh ≈ 2πσ² = 64, Σw² ≈ (N/Σh)²·πσ² = 8192, so Var ≈ 7168/(3·1024²) = 0.0023; over 400: 0.0024 -> 0.01.
    """
    images = 400
    maps = _random_maps(images, SIZE, SIZE)
    masks = np.broadcast_to(OBJECT, maps.shape)

    def mean(metric: str, **params: object) -> float:
        return float(np.mean([v.value for v in _score(metric, maps, masks, **params)]))

    assert mean("pointing_game", tolerance_px=0) == pytest.approx(1 / 8, abs=0.066)
    assert mean("relevance_mass") == pytest.approx(1 / 8, abs=0.0012)
    assert mean("relevance_rank") == pytest.approx(1 / 8, abs=0.0055)
    assert mean("foreground_index", dilation_px=0) == pytest.approx(1.0, abs=0.0096)
    assert mean("locality_index") == pytest.approx(1.0, abs=0.01)


# ---- small maps worked out by hand ----

# Signed 4 x 4 map, the object S = {(1,1), (1,2), (2,1)} (values 5, 3, 2).
HAND = np.array(
    [
        [0, 1, 2, 0],
        [1, 5, 3, 0],
        [0, 2, 4, 1],
        [-1, 0, 0, 1],
    ],
    dtype=np.float32,
)
HAND_MASK = np.zeros((4, 4), dtype=bool)
HAND_MASK[1, 1] = HAND_MASK[1, 2] = HAND_MASK[2, 1] = True


def test_hand_computed_mass_metrics() -> None:
    # Positive mass: 1+2 + 1+5+3 + 2+4+1 + 1 = 20; in S: 5+3+2 = 10 -> RMA = 0.5.
    assert _one("relevance_mass", HAND, HAND_MASK).value == pytest.approx(0.5)
    # Absolute mass adds |-1|: 21 -> 10/21.
    assert _one("relevance_mass", HAND, HAND_MASK, attribution="absolute").value == pytest.approx(10 / 21)
    # S's bounding box is rows 1-2, cols 1-2: 5+3+2+4 = 14 of 20 -> EPG = 0.7; its area 4/16.
    boxed = _one("energy_pointing_game", HAND, HAND_MASK)
    assert boxed.value == pytest.approx(0.7)
    assert boxed.components["area_share"] == pytest.approx(0.25)
    assert _one("energy_pointing_game", HAND, HAND_MASK, region="mask").value == pytest.approx(0.5)


def test_hand_computed_rank_and_pointing() -> None:
    # K = |S| = 3; the three largest are 5 (1,1) in S, 4 (2,2) not, 3 (1,2) in S -> 2/3.
    assert _one("relevance_rank", HAND, HAND_MASK).value == pytest.approx(2 / 3)
    # The maximum 5 is in S.
    pointing = _one("pointing_game", HAND, HAND_MASK, tolerance_px=0)
    assert pointing.value == 1.0
    assert pointing.components == {"distance_px": 0.0, "tied_maxima": 1.0}
    # Absolute: |-8| at (3,0) is the maximum; S's nearest pixel (2,1) is sqrt(2) away.
    flipped = HAND.copy()
    flipped[3, 0] = -8
    assert _one("pointing_game", flipped, HAND_MASK, tolerance_px=0).value == 1.0  # signed: 5 is still the max
    far = _one("pointing_game", flipped, HAND_MASK, tolerance_px=1.0, attribution="absolute")
    assert far.value == 0.0 and far.components["distance_px"] == pytest.approx(math.sqrt(2))
    assert _one("pointing_game", flipped, HAND_MASK, tolerance_px=1.5, attribution="absolute").value == 1.0


def test_hand_computed_foreground_index() -> None:
    # Absolute mass 21, 10 of it in S (3 of 16 pixels): FI = (10/21) * 16/3 = 160/63.
    plain = _one("foreground_index", HAND, HAND_MASK, dilation_px=0)
    assert plain.value == pytest.approx(160 / 63)
    assert plain.components["mass_share"] == pytest.approx(10 / 21)
    # A 3x3 dilation reaches every pixel but (3,3), whose neighbours (2,2), (2,3), (3,2) are not in S:
    # |M'| = 15, mass 21 - 1 = 20 -> FI = (20/21) * 16/15 = 64/63.
    grown = _one("foreground_index", HAND, HAND_MASK, dilation_px=1)
    assert grown.value == pytest.approx(64 / 63)
    assert grown.components["area_share"] == pytest.approx(15 / 16)


def test_hand_computed_locality_index() -> None:
    # One object pixel at the centre of 3 x 3: the disc of equal area has radius sqrt(1/pi), so
    # sigma_scale = sqrt(pi) gives sigma = 1, h = exp(-d^2/2): 1 at the centre, e^-1/2 at the 4 edges,
    # e^-1 at the 4 corners. LI = sum(a_hat * h) * 9 / sum(h).
    mask = np.zeros((3, 3), dtype=bool)
    mask[1, 1] = True
    total = 1 + 4 * math.exp(-0.5) + 4 * math.exp(-1)
    centre = np.zeros((3, 3), np.float32)
    centre[1, 1] = 1
    corner = np.zeros((3, 3), np.float32)
    corner[0, 2] = 3  # the scale does not matter
    value = _one("locality_index", centre, mask, sigma_scale=math.sqrt(math.pi))
    assert value.value == pytest.approx(9 / total)
    assert value.components["sigma_px"] == pytest.approx(1.0)
    assert _one("locality_index", corner, mask, sigma_scale=math.sqrt(math.pi)).value == pytest.approx(9 * math.exp(-1) / total)


# ---- the pointing game's tolerance and ties ----


def test_tolerance_is_a_euclidean_distance_to_the_mask() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[3, 4] = True
    saliency = np.zeros((8, 8), np.float32)
    saliency[0, 0] = 1.0  # 3 rows and 4 columns from the mask: distance 5
    assert _one("pointing_game", saliency, mask, tolerance_px=5).value == 1.0
    assert _one("pointing_game", saliency, mask, tolerance_px=4.99).value == 0.0
    assert _one("pointing_game", saliency, mask, tolerance_px=0).components["distance_px"] == pytest.approx(5.0)


def test_a_peak_ten_pixels_outside_hits_at_the_default_tolerance_only() -> None:
    # METRICS.md §3: a maximum 10 px outside S is a TorchRay hit (15 px) and a Quantus miss (0 px).
    saliency = np.zeros((SIZE, SIZE), np.float32)
    saliency[27, 14] = 1.0  # OBJECT's last row is 17
    assert _one("pointing_game", saliency, OBJECT).value == 1.0
    assert _one("pointing_game", saliency, OBJECT, tolerance_px=0).value == 0.0


def test_tied_maxima_count_by_their_share_of_hits() -> None:
    saliency = np.zeros((SIZE, SIZE), np.float32)
    saliency[12, 12] = saliency[0, 31] = saliency[31, 0] = saliency[31, 31] = 2.0  # one in S, three far away
    value = _one("pointing_game", saliency, OBJECT, tolerance_px=0)
    assert value.value == pytest.approx(0.25)
    assert value.components["tied_maxima"] == 4.0


def test_relevance_rank_splits_ties_at_the_kth_value() -> None:
    # K = 3. One pixel of S is above the tie; the two remaining slots go to 4 tied pixels, one of them
    # in S: 1 + 2 * 1/4 = 1.5 of 3 -> 0.5.
    saliency = np.zeros((4, 4), np.float32)
    saliency[1, 1] = 9
    saliency[1, 2] = saliency[0, 0] = saliency[3, 3] = saliency[0, 3] = 4
    assert _one("relevance_rank", saliency, HAND_MASK).value == pytest.approx(0.5)


# ---- complexity: Gini and entropy ----


def _one_hot(n: int) -> np.ndarray:
    values = np.zeros((1, n), np.float32)
    values[0, n // 3] = 1.0
    return values


@pytest.mark.parametrize("n", [4, 100, 1024])
def test_gini_and_entropy_of_a_one_hot_map(n: int) -> None:
    # (n-1)/n, less the spec's 1e-7 added to every value: the numerator stays n-1 (the weights 2k-n-1 sum
    # to 0), the denominator becomes n(1 + n*1e-7); for n = 1024 that is 1e-4 below (n-1)/n.
    gini = (n - 1) / (n * (1 + n * 1e-7))
    assert _one("sparseness", _one_hot(n)).value == pytest.approx(gini, abs=1e-9)
    assert _one("sparseness", _one_hot(n)).value == pytest.approx((n - 1) / n, abs=2e-4)
    assert _one("complexity", _one_hot(n)).value == pytest.approx(0.0, abs=1e-9)
    assert _one("diffusion_index", _one_hot(n)).value == pytest.approx(100 * (1 - gini), abs=1e-6)


@pytest.mark.parametrize("n", [4, 100, 1024])
def test_gini_and_entropy_of_a_constant_map(n: int) -> None:
    constant = np.full((1, n), 0.3, np.float32)
    assert _one("sparseness", constant).value == pytest.approx(0.0, abs=1e-12)
    complexity = _one("complexity", constant)
    assert complexity.value == pytest.approx(math.log(n), rel=1e-9)
    assert complexity.components["normalised"] == pytest.approx(1.0)


def test_hand_computed_gini_and_entropy() -> None:
    # Gini of 1,2,3,4: the sum of |x_i - x_j| over ordered pairs is 2*(1+2+3+1+2+1) = 20, and
    # G = 20 / (2 n^2 mean) = 20 / (2*16*2.5) = 0.25; DI = 100 * 0.75.
    ramp = np.array([[1, -2, 3, 4]], np.float32)  # |.| by default
    assert _one("sparseness", ramp).value == pytest.approx(0.25, abs=1e-6)
    assert _one("diffusion_index", ramp).value == pytest.approx(75.0, abs=1e-4)
    # Entropy of shares 1/4, 1/4, 1/2: 2*(1/4)ln4 + (1/2)ln2 = 1.5 ln 2.
    assert _one("complexity", np.array([[1, 1, 2]], np.float32)).value == pytest.approx(1.5 * math.log(2), abs=1e-9)
    # positive: the -2 becomes 0, so the shares are 1/8, 3/8, 4/8.
    shares = np.array([1, 3, 4]) / 8
    expected = -float((shares * np.log(shares)).sum())
    assert _one("complexity", ramp, attribution="positive").value == pytest.approx(expected, abs=1e-9)


def test_gini_and_entropy_of_uniform_noise() -> None:
    # For u ~ U(0,1): Gini = E|u - u'| / (2 E u) = (1/3) / 1 = 1/3; the entropy of u / Σu tends to
    # ln N - (E[u ln u] / E[u] - ln E[u]) = ln N - (-1/2 + ln 2). 4096 pixels put both within 0.01.
    maps = _random_maps(4, 64, 64)
    for value in _score("sparseness", maps):
        assert value.value == pytest.approx(1 / 3, abs=0.01)
    for value in _score("complexity", maps):
        assert value.value == pytest.approx(math.log(4096) + 0.5 - math.log(2), abs=0.01)


def test_complexity_metrics_do_not_depend_on_the_maps_scale() -> None:
    maps = _random_maps(3, 16, 16, distribution="gaussian")
    for metric in MAP_METRICS:
        small = [v.value for v in _score(metric, maps * 1e-6)]
        large = [v.value for v in _score(metric, maps * 1e6)]
        assert small == pytest.approx(large, rel=1e-6), metric


def test_an_all_zero_map_is_scored_as_uniform_for_complexity_and_as_pointing_nowhere_for_mass() -> None:
    zero = np.zeros((8, 8), np.float32)
    mask = _square_mask(8, 2, 2, 3)
    assert _one("sparseness", zero).value == pytest.approx(0.0, abs=1e-12)
    assert _one("complexity", zero).value == pytest.approx(math.log(64))
    assert _one("relevance_mass", zero, mask).value == 0.0
    assert _one("foreground_index", zero, mask).value == 0.0


# ---- batches, flags and validation ----


@pytest.mark.parametrize("metric", MASK_METRICS + MAP_METRICS)
def test_batch_equals_per_item(metric: str) -> None:
    maps = _random_maps(3, 16, 16, distribution="gaussian")
    masks = np.stack([_square_mask(16, 2, 3, 5), _square_mask(16, 9, 9, 6), _square_mask(16, 0, 0, 16)])
    needs = METRICS.get(metric).needs_masks
    batched = _score(metric, maps, masks if needs else None)
    for item in range(3):
        alone = _one(metric, maps[item], masks[item] if needs else None)
        assert alone.value == pytest.approx(batched[item].value)
        assert alone.components == pytest.approx(dict(batched[item].components))


def test_flags() -> None:
    assert {name for name in METRICS.names() if METRICS.get(name).needs_masks} >= set(MASK_METRICS)
    for name in MAP_METRICS:
        assert not METRICS.get(name).needs_masks, f"{name} reads the map alone"
    for name in MASK_METRICS + ("sparseness",):
        assert METRICS.get(name).higher_is_better, name
    assert not METRICS.get("complexity").higher_is_better
    assert not METRICS.get("diffusion_index").higher_is_better


@pytest.mark.parametrize("metric", MASK_METRICS)
def test_masks_are_checked(metric: str) -> None:
    saliency = np.ones((1, 8, 8), np.float32)
    cases = [
        (None, "MASKS_REQUIRED"),
        (np.zeros((1, 8, 8), bool), "EMPTY_MASK"),
        (np.ones((1, 8, 7), bool), "MASK_SHAPE_MISMATCH"),
        (np.ones((2, 8, 8), bool), "MASK_SHAPE_MISMATCH"),
    ]
    for masks, reason in cases:
        with pytest.raises(InvalidArgument) as caught:
            _score(metric, saliency, masks)
        assert caught.value.reason == reason, (metric, reason)


@pytest.mark.parametrize("metric", MASK_METRICS + MAP_METRICS)
def test_non_finite_maps_are_rejected(metric: str) -> None:
    saliency = np.ones((1, 8, 8), np.float32)
    saliency[0, 3, 3] = np.nan
    with pytest.raises(InvalidArgument) as caught:
        _score(metric, saliency, np.ones((1, 8, 8), bool) if METRICS.get(metric).needs_masks else None)
    assert caught.value.reason == "NON_FINITE_SALIENCY"


# ---- the random method ----


def test_random_maps_are_uniform_or_gaussian_noise() -> None:
    uniform = _random_maps(4, 64, 64)
    assert uniform.min() >= 0.0 and uniform.max() < 1.0
    # 16384 draws: the mean's standard error is sqrt(1/12/16384) = 0.0023.
    assert uniform.mean() == pytest.approx(0.5, abs=0.01)
    gaussian = _random_maps(4, 64, 64, distribution="gaussian")
    assert gaussian.mean() == pytest.approx(0.0, abs=0.04)
    assert gaussian.std() == pytest.approx(1.0, abs=0.03)


def test_random_maps_follow_the_seed_and_the_image() -> None:
    first, again, other_seed = _random_maps(2, 8, 8, seed=1), _random_maps(2, 8, 8, seed=1), _random_maps(2, 8, 8, seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first[0], first[1]), "different images get different noise"
