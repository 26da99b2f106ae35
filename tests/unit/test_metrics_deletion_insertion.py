"""Deletion and insertion: METRICS.md §1's known answers, batching, determinism and validation."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.metrics import METRICS, MetricInput, MetricValue, deletion_insertion
from saliency_service.core.metrics.deletion_insertion import perturbation_curves, pixel_ranks, trapezoid_auc
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import resolve_params


def _score(
    model: LoadedModel, metric: str, x: np.ndarray, saliency: np.ndarray, targets: np.ndarray, **params: object
) -> list[MetricValue]:
    cls = METRICS.get(metric)
    resolved = resolve_params(cls.params, params, metric)
    request = MetricInput(model=model, x=x, saliency=saliency, targets=targets, params=resolved, seed=0)
    return cls().score(request)


# ---- the AUC formula ----


@pytest.mark.parametrize("n", [1, 4, 128])
def test_auc_known_answers(n: int) -> None:
    assert trapezoid_auc(np.ones(n + 1)) == pytest.approx(1.0)
    assert trapezoid_auc(np.r_[1.0, np.zeros(n)]) == pytest.approx(0.5 / n)
    assert trapezoid_auc(np.linspace(1.0, 0.0, n + 1)) == pytest.approx(0.5)


# ---- the synthetic model: logits [log p, log(1-p)], p = share of region M still original ----


@pytest.mark.parametrize("substrate", ["zero", "blur"])
def test_region_map_gives_f_over_two(substrate: str, region_model, region_original: np.ndarray, region_mask: np.ndarray) -> None:
    f = region_mask.mean()
    assert f == 0.25
    saliency = region_mask.astype(np.float32)[None]
    targets = np.array([0])
    (deletion,) = _score(region_model.model, "deletion", region_original, saliency, targets, step=16, substrate=substrate)
    (insertion,) = _score(region_model.model, "insertion", region_original, saliency, targets, step=16, substrate=substrate)
    assert deletion.value == pytest.approx(f / 2, abs=1e-5)
    assert insertion.value == pytest.approx(1 - f / 2, abs=1e-5)
    # 256 pixels / 16 per step: 17 points; M's 64 pixels go in the first 4 steps.
    removed = np.minimum(np.arange(17) * 16, 64) / 64
    np.testing.assert_allclose(deletion.curve, 1 - removed, atol=1e-5)
    np.testing.assert_allclose(insertion.curve, removed, atol=1e-5)


def test_random_maps_give_deletion_near_one_half(region_model, region_original: np.ndarray) -> None:
    items = 12
    x = np.repeat(region_original, items, axis=0)
    saliency = np.random.default_rng(3).random((items, *region_original.shape[2:])).astype(np.float32)
    values = [v.value for v in _score(region_model.model, "deletion", x, saliency, np.zeros(items, dtype=np.int64), step=16)]
    assert np.mean(values) == pytest.approx(0.5, abs=0.05)


def test_logit_score_is_the_raw_logit(region_model, region_original: np.ndarray, region_mask: np.ndarray) -> None:
    saliency = region_mask.astype(np.float32)[None]
    (value,) = _score(region_model.model, "deletion", region_original, saliency, np.array([0]), step=16, score="logit")
    assert value.curve[0] == pytest.approx(np.log(1 + 1e-6), abs=1e-5)
    assert value.curve[-1] == pytest.approx(np.log(1e-6), abs=1e-3)


@pytest.mark.parametrize(("step", "points"), [(1, 257), (100, 4), (256, 2)])
def test_curve_has_n_plus_one_points(step: int, points: int, region_model, region_original: np.ndarray) -> None:
    saliency = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    for metric in ("deletion", "insertion"):
        (value,) = _score(region_model.model, metric, region_original, saliency, np.array([0]), step=step)
        assert value.curve.shape == (points,)
        # The short last chunk still completes the substitution.
        assert value.curve[-1 if metric == "deletion" else 0] == pytest.approx(0.0, abs=1e-5)


# ---- batching and determinism on the tiny CNN ----


def test_batch_equals_per_item_and_is_one_forward_pass(tiny_cnn) -> None:
    spec = tiny_cnn.model.config.input
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 3, spec.height, spec.width)).astype(np.float32)
    saliency = rng.random((3, spec.height, spec.width)).astype(np.float32)
    targets = np.array([0, 3, 1])
    passes: list[int] = []
    counted = LoadedModel(tiny_cnn.model.config, tiny_cnn.model.onnx, tiny_cnn.model.program, lambda model, kind, size: passes.append(size))
    for metric in ("deletion", "insertion"):
        passes.clear()
        batched = _score(counted, metric, x, saliency, targets, step=40)
        points = -(-spec.height * spec.width // 40) + 1
        assert passes == [3 * points], "every curve image of every item goes through one logits call"
        for item in range(3):
            (alone,) = _score(tiny_cnn.model, metric, x[item : item + 1], saliency[item : item + 1], targets[item : item + 1], step=40)
            np.testing.assert_allclose(alone.curve, batched[item].curve, rtol=1e-5, atol=1e-6)
            assert alone.value == pytest.approx(batched[item].value, abs=1e-6)
            assert 0.0 <= alone.value <= 1.0


@pytest.mark.parametrize(
    ("chunk_images", "max_batch", "sizes"), [(1, 1, {1}), (3, 1, {3}), (7, 1, {7, 3}), (7, 2, {6}), (7, 4, {4}), (100, 4, {24})]
)
def test_curve_images_are_the_same_whatever_the_chunking(
    chunk_images: int, max_batch: int, sizes: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks that split an item's run of curve images (or hold several items) see the images of the definition;
    a chunk holds a whole number of forward batches where it can (24 curve images in all here)."""
    rng = np.random.default_rng(9)
    batch, channels, height, width, step = 3, 2, 4, 5, 3
    start = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    end = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    saliency = rng.random((batch, height, width)).astype(np.float32)
    seen: list[np.ndarray] = []

    def record(images: np.ndarray) -> np.ndarray:
        seen.append(images.copy())
        return np.zeros((len(images), 2), dtype=np.float32)

    monkeypatch.setattr(deletion_insertion, "_CHUNK_BYTES", chunk_images * channels * height * width * 4)
    perturbation_curves(record, start, end, saliency, np.zeros(batch, dtype=np.int64), step=step, score="logit", max_batch=max_batch)
    images = np.concatenate(seen)
    points = -(-height * width // step) + 1
    assert len(images) == batch * points and {len(chunk) for chunk in seen} == sizes
    for item in range(batch):
        order = np.argsort(-saliency[item].ravel(), kind="stable")
        for point in range(points):
            expected = start[item].reshape(channels, -1).copy()
            moved = order[: point * step]
            expected[:, moved] = end[item].reshape(channels, -1)[:, moved]
            np.testing.assert_array_equal(images[item * points + point], expected.reshape(channels, height, width))


def test_ties_are_ranked_by_pixel_index() -> None:
    constant = np.zeros((2, 4, 5), dtype=np.float32)
    np.testing.assert_array_equal(pixel_ranks(constant), np.tile(np.arange(20), (2, 1)))
    saliency = np.array([[[0.5, 1.0, 0.5, 1.0]]], dtype=np.float32)
    np.testing.assert_array_equal(pixel_ranks(saliency), [[2, 0, 3, 1]])


def test_higher_is_better_flags() -> None:
    assert METRICS.get("deletion").higher_is_better is False
    assert METRICS.get("insertion").higher_is_better is True


# ---- validation ----


def test_step_larger_than_the_image_is_rejected(region_model, region_original: np.ndarray) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _score(region_model.model, "deletion", region_original, np.zeros((1, 16, 16), np.float32), np.array([0]), step=257)
    assert caught.value.reason == "PARAMETER_OUT_OF_RANGE"
    assert "256" in caught.value.message


@pytest.mark.parametrize(
    ("saliency", "reason"),
    [
        (np.zeros((1, 16, 15), np.float32), "SALIENCY_SHAPE_MISMATCH"),
        (np.zeros((2, 16, 16), np.float32), "SALIENCY_SHAPE_MISMATCH"),
        (np.full((1, 16, 16), np.nan, np.float32), "NON_FINITE_SALIENCY"),
    ],
)
def test_bad_maps_are_rejected(saliency: np.ndarray, reason: str, region_model, region_original: np.ndarray) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _score(region_model.model, "insertion", region_original, saliency, np.array([0]))
    assert caught.value.reason == reason
