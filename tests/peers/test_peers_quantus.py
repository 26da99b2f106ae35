"""Peer check: our map-only metrics against Quantus 0.6.0 on the same maps and masks (METRICS.md §3, §4).

Quantus needs no torch for these metrics (its model argument stays None). Where Quantus differs by design
the inputs avoid the difference: non-negative maps for relevance mass (Quantus does not clip negatives),
no ties for the pointing game and relevance rank (Quantus counts any tied maximum as a hit and ranks ties by
argsort), and tolerance 0 (Quantus' exact rule). Run where quantus is installed:

    PYTHONPATH=service:clients/python python -m pytest -q tests/peers/test_peers_quantus.py
"""

from __future__ import annotations

from typing import cast

import pytest

quantus = pytest.importorskip("quantus")

import numpy as np  # noqa: E402

from saliency_service.core.metrics import METRICS, MetricInput  # noqa: E402
from saliency_service.core.models.model import LoadedModel  # noqa: E402
from saliency_service.core.params import resolve_params  # noqa: E402

SIZE = 32
IMAGES = 6


def _ours(metric: str, maps: np.ndarray, masks: np.ndarray | None, **params: object) -> np.ndarray:
    cls = METRICS.get(metric)
    request = MetricInput(
        model=cast(LoadedModel, None),  # map-only metrics never touch the model
        x=np.zeros((len(maps), 3, SIZE, SIZE), np.float32),
        saliency=maps.astype(np.float32),
        targets=np.zeros(len(maps), np.int64),
        params=resolve_params(cls.params, params, metric),
        seed=0,
        masks=masks,
    )
    return np.array([v.value for v in cls().score(request)])


def _theirs(metric: object, maps: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
    x = np.random.default_rng(0).random((len(maps), 3, SIZE, SIZE)).astype(np.float32)
    s_batch = None if masks is None else masks[:, None].astype(np.float32)
    scores = metric(  # type: ignore[operator]
        model=None, x_batch=x, y_batch=np.zeros(len(maps), np.int64), a_batch=maps[:, None].astype(np.float32), s_batch=s_batch
    )
    return np.asarray(scores, dtype=np.float64)


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(non-negative maps, signed maps, masks): random squares as objects; every other map peaks on its object."""
    rng = np.random.default_rng(42)
    positive = rng.random((IMAGES, SIZE, SIZE))
    signed = rng.standard_normal((IMAGES, SIZE, SIZE))
    masks = np.zeros((IMAGES, SIZE, SIZE), dtype=bool)
    for i in range(IMAGES):
        top, left, side = rng.integers(0, 16), rng.integers(0, 16), rng.integers(4, 16)
        masks[i, top : top + side, left : left + side] = True
        if i % 2 == 0:
            positive[i, top + side // 2, left + side // 2] = 2.0
    return positive, signed, masks


def test_pointing_game_agrees(case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    positive, _, masks = case
    ours = _ours("pointing_game", positive, masks, tolerance_px=0)
    np.testing.assert_array_equal(ours, _theirs(quantus.PointingGame(disable_warnings=True), positive, masks))
    assert 0 < ours.sum() < IMAGES, "the case has hits and misses"


def test_relevance_mass_and_rank_agree(case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    positive, _, masks = case
    mass = _theirs(quantus.RelevanceMassAccuracy(disable_warnings=True), positive, masks)
    np.testing.assert_allclose(_ours("relevance_mass", positive, masks), mass, rtol=1e-5)
    rank = _theirs(quantus.RelevanceRankAccuracy(disable_warnings=True), positive, masks)
    np.testing.assert_allclose(_ours("relevance_rank", positive, masks), rank, rtol=1e-6)


def test_sparseness_and_complexity_agree(case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, signed, _ = case
    sparseness = _theirs(quantus.Sparseness(disable_warnings=True), signed, None)
    np.testing.assert_allclose(_ours("sparseness", signed, None), sparseness, rtol=1e-5)
    complexity = _theirs(quantus.Complexity(disable_warnings=True), signed, None)
    np.testing.assert_allclose(_ours("complexity", signed, None), complexity, rtol=1e-5)
