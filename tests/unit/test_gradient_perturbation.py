"""Gradient x input, Integrated Gradients' supplied baseline, Occlusion and RISE: analytic cases and slow references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from saliency_service.core.errors import InvalidArgument, NotFound, ResourceExhausted
from saliency_service.core.images import gaussian_blur
from saliency_service.core.methods import METHODS, MethodInput, perturbation
from saliency_service.core.methods.perturbation import MAX_RISE_MASKS, RiseMasks, upsample_matrix
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import resolve_params


def _request(
    model: LoadedModel,
    method: str,
    x: np.ndarray,
    targets: np.ndarray,
    seed: int = 0,
    foils: np.ndarray | None = None,
    supplied: np.ndarray | None = None,
    **params: object,
) -> MethodInput:
    """`supplied` is MethodInput.baseline (the caller's reference images); `params` are the method's parameters."""
    cls = METHODS.get(method)
    return MethodInput(model, x, targets, resolve_params(cls.params, params, method), None, seed, foils=foils, baseline=supplied)


def _attribute(model: LoadedModel, method: str, x: np.ndarray, targets: np.ndarray, **kwargs: object) -> np.ndarray:
    request = _request(model, method, x, targets, **kwargs)  # type: ignore[arg-type]
    return METHODS.get(method)().attribute(request)


def _batch(model: LoadedModel, batch: int, seed: int) -> np.ndarray:
    spec = model.config.input
    return np.random.default_rng(seed).standard_normal((batch, 3, spec.height, spec.width)).astype(np.float32)


def _linear_weights(linear_net) -> np.ndarray:
    spec = linear_net.model.config.input
    return linear_net.module.head.weight.detach().numpy().reshape(-1, 3, spec.height, spec.width).astype(np.float64)


def _objective(module: torch.nn.Module, x: np.ndarray, target: int, foil: int | None) -> np.ndarray:
    """The plain torch module's objective for each row of x (the reference path: no onnxruntime, no program)."""
    with torch.no_grad():
        logits = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).double().numpy()
    return logits[:, target] - (logits[:, foil] if foil is not None else 0.0)


# ---- gradient x input ----


def test_input_x_gradient_of_linear_model_is_weights_times_input(linear_net) -> None:
    x, targets = _batch(linear_net.model, 3, 0), np.array([0, 1, 2])
    expected = (_linear_weights(linear_net)[targets] * x).sum(axis=1)
    np.testing.assert_allclose(_attribute(linear_net.model, "input_x_gradient", x, targets), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_foil", [False, True])
def test_input_x_gradient_matches_autograd_reference(with_foil: bool, tiny_cnn) -> None:
    x, targets = _batch(tiny_cnn.model, 3, 1), np.array([0, 1, 3])
    foils = np.array([2, 0, 1]) if with_foil else None
    fast = _attribute(tiny_cnn.model, "input_x_gradient", x, targets, foils=foils)
    for item in range(3):
        image = torch.from_numpy(x[item : item + 1]).requires_grad_(True)
        logits = tiny_cnn.module(image)[0]
        objective = logits[targets[item]] - (logits[foils[item]] if foils is not None else 0)
        (gradient,) = torch.autograd.grad(objective, image)
        expected = (image * gradient).sum(dim=1)[0].detach().numpy()
        np.testing.assert_allclose(fast[item], expected, rtol=1e-4, atol=1e-6)


# ---- Integrated Gradients with a supplied baseline ----


def test_supplied_zero_baseline_equals_the_zero_choice(tiny_cnn) -> None:
    x, targets = _batch(tiny_cnn.model, 2, 2), np.array([1, 2])
    zero = _attribute(tiny_cnn.model, "integrated_gradients", x, targets, steps=8)
    supplied = _attribute(tiny_cnn.model, "integrated_gradients", x, targets, supplied=np.zeros_like(x), steps=8, baseline="supplied")
    np.testing.assert_array_equal(supplied, zero)
    assert np.abs(zero).max() > 0


def test_supplied_baseline_is_used_per_item_and_under_noise(tiny_cnn) -> None:
    """A supplied blurred copy gives the 'blur' choice's map, item by item; under SmoothGrad the supplied start stays
    fixed while the input is noised (the 'blur' choice would blur each noisy copy), so there zeros are compared."""
    x, targets = _batch(tiny_cnn.model, 3, 3), np.array([0, 3, 1])
    blurred = gaussian_blur(torch.from_numpy(x)).numpy()
    expected = _attribute(tiny_cnn.model, "integrated_gradients", x, targets, baseline="blur", steps=6)
    got = _attribute(tiny_cnn.model, "integrated_gradients", x, targets, supplied=blurred, baseline="supplied", steps=6)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    noisy = {"steps": 6, "noise": "smoothgrad", "noise_samples": 3}
    expected = _attribute(tiny_cnn.model, "integrated_gradients", x, targets, seed=2, baseline="zero", **noisy)
    got = _attribute(tiny_cnn.model, "integrated_gradients", x, targets, seed=2, supplied=np.zeros_like(x), baseline="supplied", **noisy)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # Completeness with the supplied start: the map sums to objective(x) - objective(baseline).
    start = _batch(tiny_cnn.model, 3, 4)
    maps = _attribute(tiny_cnn.model, "integrated_gradients", x, targets, supplied=start, baseline="supplied", steps=64)
    change = np.array(
        [
            _objective(tiny_cnn.module, x[i : i + 1], targets[i], None)[0]
            - _objective(tiny_cnn.module, start[i : i + 1], targets[i], None)[0]
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), change, rtol=0.01)


def test_supplied_baseline_errors(tiny_cnn) -> None:
    x, targets = _batch(tiny_cnn.model, 2, 5), np.array([0, 1])
    with pytest.raises(InvalidArgument) as missing:
        _attribute(tiny_cnn.model, "integrated_gradients", x, targets, baseline="supplied")
    assert missing.value.reason == "BASELINE_MISSING" and "baseline" in missing.value.message
    for choice in ("zero", "blur", "uniform"):
        with pytest.raises(InvalidArgument) as unused:
            _attribute(tiny_cnn.model, "integrated_gradients", x, targets, supplied=np.zeros_like(x), baseline=choice)
        assert unused.value.reason == "BASELINE_NOT_USED" and "supplied" in unused.value.message
    for noise in ("none", "smoothgrad"):
        with pytest.raises(InvalidArgument) as mismatch:
            _attribute(tiny_cnn.model, "integrated_gradients", x, targets, supplied=np.zeros_like(x[:1]), baseline="supplied", noise=noise)
        assert mismatch.value.reason == "BASELINE_SHAPE_MISMATCH"
    assert METHODS.get("integrated_gradients").takes_baseline and not METHODS.get("saliency").takes_baseline


# ---- Occlusion ----


def _fill(kind: str, image: np.ndarray) -> np.ndarray:
    if kind == "zero":
        return np.zeros_like(image)
    if kind == "mean":
        return np.broadcast_to(image.mean(axis=(1, 2), keepdims=True), image.shape).copy()
    return gaussian_blur(torch.from_numpy(image[None]))[0].numpy()


def _window_tops(size: int, window: int, stride: int) -> list[int]:
    """Windows step by `stride` until one reaches the far edge (it may overhang)."""
    tops = [0]
    while tops[-1] + window < size:
        tops.append(tops[-1] + stride)
    return tops


def _occlusion_reference(score, image: np.ndarray, window: int, stride: int, fill: np.ndarray) -> np.ndarray:
    """Zeiler & Fergus with Captum's averaging, one window at a time: mean over covering windows of score(x) - score(occluded)."""
    _, height, width = image.shape
    total, count = np.zeros((height, width)), np.zeros((height, width))
    clean = score(image)
    for top in _window_tops(height, window, stride):
        for left in _window_tops(width, window, stride):
            occluded = image.copy()
            occluded[:, top : top + window, left : left + window] = fill[:, top : top + window, left : left + window]
            total[top : top + window, left : left + window] += clean - score(occluded)
            count[top : top + window, left : left + window] += 1
    assert count.min() >= 1
    return total / count


@pytest.mark.parametrize("fill", ["zero", "mean", "blur"])
@pytest.mark.parametrize(("window", "stride"), [(5, 3), (4, 4), (7, 6)])
def test_occlusion_matches_window_by_window_reference(fill: str, window: int, stride: int, tiny_cnn) -> None:
    x, targets, foils = _batch(tiny_cnn.model, 2, 6), np.array([0, 2]), np.array([1, 3])
    for item_foils in (None, foils):
        fast = _attribute(tiny_cnn.model, "occlusion", x, targets, foils=item_foils, window=window, stride=stride, fill=fill)
        for item in range(len(x)):
            foil = None if item_foils is None else int(item_foils[item])

            def score(image: np.ndarray, item: int = item, foil: int | None = foil) -> float:
                return float(_objective(tiny_cnn.module, image[None], int(targets[item]), foil)[0])

            expected = _occlusion_reference(score, x[item], window, stride, _fill(fill, x[item]))
            np.testing.assert_allclose(fast[item], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("fill", ["zero", "mean", "blur"])
def test_occlusion_of_linear_model_is_the_windows_exact_contributions(fill: str, linear_net) -> None:
    x, targets = _batch(linear_net.model, 2, 7), np.array([2, 0])
    weights = _linear_weights(linear_net)[targets]
    for item in range(2):
        # A linear objective drops by exactly sum over the window of w * (x - fill).
        contribution = (weights[item] * (x[item] - _fill(fill, x[item]))).sum(axis=0)
        single = _attribute(linear_net.model, "occlusion", x[item : item + 1], targets[item : item + 1], window=1, stride=1, fill=fill)
        np.testing.assert_allclose(single[0], contribution, rtol=1e-4, atol=1e-5)
        height, width = contribution.shape
        total, count = np.zeros((height, width)), np.zeros((height, width))
        for top in (0, 2, 4, 6):  # window 3, stride 2 on 9 x 12: tops 0..6, lefts 0..10 (the last overhangs by one)
            for left in (0, 2, 4, 6, 8, 10):
                total[top : top + 3, left : left + 3] += contribution[top : top + 3, left : left + 3].sum()
                count[top : top + 3, left : left + 3] += 1
        windowed = _attribute(linear_net.model, "occlusion", x[item : item + 1], targets[item : item + 1], window=3, stride=2, fill=fill)
        np.testing.assert_allclose(windowed[0], total / count, rtol=1e-4, atol=1e-5)


def test_occlusion_errors(tiny_cnn, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, targets = tiny_cnn.model, _batch(tiny_cnn.model, 1, 8), np.array([0])
    with pytest.raises(InvalidArgument) as large:
        _attribute(model, "occlusion", x, targets, window=21, stride=4)
    assert large.value.reason == "WINDOW_TOO_LARGE" and "window <= 20" in large.value.message
    with pytest.raises(InvalidArgument) as gaps:
        _attribute(model, "occlusion", x, targets, window=3, stride=4)
    assert gaps.value.reason == "STRIDE_LARGER_THAN_WINDOW"
    monkeypatch.setattr(perturbation, "MAX_OCCLUSION_WINDOWS", 100)
    with pytest.raises(ResourceExhausted) as many:
        _attribute(model, "occlusion", x, targets, window=2, stride=1)  # 19 x 27 windows
    assert many.value.reason == "TOO_MANY_WINDOWS" and "513" in many.value.message
    assert _attribute(model, "occlusion", x, targets, window=5, stride=5).shape == (1, 20, 28)  # 4 x 6 windows


# ---- RISE ----


def _reference_masks(seed: int, count: int, grid: int, p: float, height: int, width: int) -> np.ndarray:
    """The RISE code's masks, one at a time: the same draws, scipy's mirror-mode linear interpolation, a crop."""
    rng = np.random.default_rng(seed)
    grids = rng.random((count, grid, grid)) < p
    cell_h, cell_w = math.ceil(height / grid), math.ceil(width / grid)
    shift_y, shift_x = rng.integers(0, cell_h, count), rng.integers(0, cell_w, count)
    up_h, up_w = (grid + 1) * cell_h, (grid + 1) * cell_w
    rows = (np.arange(up_h) + 0.5) * grid / up_h - 0.5
    cols = (np.arange(up_w) + 0.5) * grid / up_w - 0.5
    coordinates = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    masks = np.empty((count, height, width))
    for i in range(count):
        upsampled = ndimage.map_coordinates(grids[i].astype(np.float64), coordinates, order=1, mode="mirror")
        masks[i] = upsampled[shift_y[i] : shift_y[i] + height, shift_x[i] : shift_x[i] + width]
    return masks


@pytest.mark.parametrize(("grid", "p", "size"), [(8, 0.1, (20, 28)), (3, 0.5, (9, 12)), (5, 0.3, (16, 7))])
def test_rise_masks_match_reference(grid: int, p: float, size: tuple[int, int]) -> None:
    expected = _reference_masks(11, 50, grid, p, *size)
    masks = RiseMasks(11, 50, grid, p, *size)
    np.testing.assert_allclose(masks.chunk(0, 50), expected, atol=1e-6)
    np.testing.assert_allclose(masks.chunk(17, 23), expected[17:23], atol=1e-6)
    assert expected.min() >= 0 and expected.max() <= 1


def test_upsample_matrix_rows_are_interpolation_weights() -> None:
    matrix = upsample_matrix(4, 23)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    assert matrix.min() >= 0 and np.count_nonzero(matrix, axis=1).max() <= 2


@pytest.mark.parametrize(("score", "with_foil"), [("probability", False), ("probability", True), ("logit", True)])
def test_rise_matches_mask_by_mask_reference(score: str, with_foil: bool, tiny_cnn) -> None:
    x, targets = _batch(tiny_cnn.model, 2, 9), np.array([3, 1])
    foils = np.array([0, 2]) if with_foil else None
    count, grid, p, seed = 70, 4, 0.3, 12
    fast = _attribute(tiny_cnn.model, "rise", x, targets, seed=seed, foils=foils, masks=count, grid=grid, p=p, score=score)
    masks = _reference_masks(seed, count, grid, p, 20, 28)
    for item in range(2):
        expected = np.zeros((20, 28))
        for mask in masks:
            with torch.no_grad():
                logits = tiny_cnn.module(torch.from_numpy((x[item] * mask[None]).astype(np.float32))[None])[0].double()
            values = torch.softmax(logits, dim=0) if score == "probability" else logits
            f = float(values[targets[item]] - (values[foils[item]] if foils is not None else 0))
            expected += f * mask
        expected /= count * p
        np.testing.assert_allclose(fast[item], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_rise_keeping_everything_gives_the_unmasked_score(tiny_cnn) -> None:
    x, targets = _batch(tiny_cnn.model, 2, 10), np.array([0, 1])
    maps = _attribute(tiny_cnn.model, "rise", x, targets, masks=5, p=1.0)
    with torch.no_grad():
        probabilities = torch.softmax(tiny_cnn.module(torch.from_numpy(x)).double(), dim=1).numpy()
    np.testing.assert_allclose(maps, np.broadcast_to(probabilities[[0, 1], targets][:, None, None], maps.shape), rtol=1e-5)


def test_rise_on_a_model_linear_in_the_mask_converges_to_its_expectation(linear_net) -> None:
    """logit(x * M) = sum_u c_u M_u + b with c = sum over channels of (w_target - w_foil) x, so E[RISE] is known.

    A mask is M = A g: g the s x s Bernoulli(p) grid, A the interpolation-and-crop matrix of a random shift,
    whose rows sum to 1. Then E[M_u] = p and E[M_u M_v] = p(1 - p) E_shift[A A^T]_uv + p², so
    E[S_v] = (1/p) E[f M_v] = (1 - p) (K c)_v + p sum(c) + b, K = E_shift[A A^T] = K_rows (x) K_cols.
    """
    model = linear_net.model
    targets, foils = np.array([2]), np.array([0])
    count, grid, p, seed = 16000, 3, 0.5, 13
    weights = _linear_weights(linear_net)
    bias = linear_net.module.head.bias.detach().double().numpy()
    # An image that raises the objective on the left half and lowers it on the right, so the map has contrast.
    side = np.where(np.arange(weights.shape[-1]) < weights.shape[-1] // 2, 3.0, -3.0)
    x = (np.sign(weights[2] - weights[0]) * side)[None].astype(np.float32)
    c = ((weights[2] - weights[0]) * x[0]).sum(axis=0)
    b = bias[2] - bias[0]
    height, width = c.shape

    def shift_average(size: int) -> np.ndarray:
        cell = math.ceil(size / grid)
        upsampled = (grid + 1) * cell
        coordinate = (np.arange(upsampled) + 0.5) * grid / upsampled - 0.5
        # Column g of the interpolation matrix is the upsampled unit grid e_g (scipy, independent of the code).
        matrix = np.stack([ndimage.map_coordinates(np.eye(grid)[g], [coordinate], order=1, mode="mirror") for g in range(grid)], axis=1)
        return np.mean([matrix[d : d + size] @ matrix[d : d + size].T for d in range(cell)], axis=0)

    expected = (1 - p) * shift_average(height) @ c @ shift_average(width) + p * c.sum() + b
    maps = _attribute(model, "rise", x, targets, seed=seed, foils=foils, masks=count, grid=grid, p=p, score="logit")[0]

    # Standard error per pixel from the same masks (verified against the reference above).
    masks = _reference_masks(seed, count, grid, p, height, width)
    terms = ((masks * c).sum(axis=(1, 2)) + b)[:, None, None] * masks / p
    tolerance = 5 * terms.std(axis=0) / math.sqrt(count)
    assert np.all(np.abs(maps - expected) <= tolerance), np.abs(maps - expected).max()
    # The tolerance is tight: it is far below the map's contrast, and below plausible mistakes' errors.
    error, contrast = np.abs(maps - expected).max(), expected.max() - expected.min()
    print(f"RISE vs expectation: max |error| {error:.4f}, tolerance {tolerance.max():.4f}, contrast {contrast:.4f}")
    assert tolerance.max() < 0.1 * contrast
    divided_by_n_only = maps * p  # forgetting the 1 / p of the 1 / (N p) normalisation
    assert np.abs(divided_by_n_only - expected).max() > 3 * tolerance.max()
    independent_pixels = (1 - p) * c + p * c.sum() + b  # what E[M_u M_v] = p² off the diagonal would give
    assert np.abs(independent_pixels - expected).max() > 3 * tolerance.max()


def test_rise_and_occlusion_parameter_errors(tiny_cnn) -> None:
    bad = [
        ("rise", {"masks": MAX_RISE_MASKS + 1}, "PARAMETER_OUT_OF_RANGE"),
        ("rise", {"masks": 0}, "PARAMETER_OUT_OF_RANGE"),
        ("rise", {"p": 0.0}, "PARAMETER_OUT_OF_RANGE"),
        ("rise", {"grid": 1}, "PARAMETER_OUT_OF_RANGE"),
        ("rise", {"score": "softmax"}, "INVALID_PARAMETER"),
        ("occlusion", {"window": 0}, "PARAMETER_OUT_OF_RANGE"),
        ("occlusion", {"stride": 2.5}, "INVALID_PARAMETER"),
        ("occlusion", {"fill": "grey"}, "INVALID_PARAMETER"),
        ("input_x_gradient", {"noise_samples": 0}, "PARAMETER_OUT_OF_RANGE"),
    ]
    for method, params, reason in bad:
        with pytest.raises(InvalidArgument) as caught:
            resolve_params(METHODS.get(method).params, params, method)
        assert caught.value.reason == reason, (method, params)
    with pytest.raises(NotFound):
        resolve_params(METHODS.get("rise").params, {"cells": 8}, "rise")
