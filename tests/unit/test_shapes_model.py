"""The shipped `shapes` model: it loads, it is accurate, IG is complete on it, Grad-CAM localises."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.models.model import LoadedModel, RuntimeOptions
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.params import resolve_params
from saliency_service.shapes.export import LAYERS
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, LABELS, generate_batch
from saliency_service.shapes.network import preprocess

# Held-out seeds distinct from the ones the README's measurement and the API tests use.
SEEDS = [HELDOUT_SEED_OFFSET + 700_000 + i for i in range(200)]


@pytest.fixture(scope="module")
def shapes() -> LoadedModel:
    return LoadedModel.load(EMBEDDED_REPOSITORY / "shapes", RuntimeOptions(threads=1, prefer_cuda=False))


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels, masks = generate_batch(SEEDS)
    return preprocess(images).numpy(), labels, masks


def test_embedded_repository_serves_shapes() -> None:
    statuses = ModelRepository(EMBEDDED_REPOSITORY).load_all()
    assert [(s.name, s.ready) for s in statuses] == [("shapes", True), ("shapes_grid", True), ("vit_shapes", True)]
    config = statuses[0].config
    assert config is not None
    assert config.labels == LABELS
    assert [layer.name for layer in config.layers] == list(LAYERS)
    assert config.layer("layer3").shape[1:] == (16, 16)


def test_heldout_accuracy(shapes: LoadedModel, heldout: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    x, labels, _ = heldout
    accuracy = float((shapes.logits(x).argmax(axis=1) == labels).mean())
    assert accuracy >= 0.97, accuracy


def test_integrated_gradients_is_complete_within_one_percent(
    shapes: LoadedModel, heldout: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    x, labels, _ = heldout
    x, targets = x[:8], labels[:8].astype(np.int64)
    # A ReLU network's gradient is piecewise constant along the path: Gauss-Legendre nodes (the
    # default, which shines on smooth integrands) converge slowly there; the midpoint rule is steady.
    params = resolve_params(METHODS.get("integrated_gradients").params, {"steps": 512, "rule": "riemann_middle"}, "ig")
    maps = METHODS.get("integrated_gradients")().attribute(MethodInput(shapes, x, targets, params, None, 0))
    rows = np.arange(len(targets))
    difference = shapes.logits(x)[rows, targets] - shapes.logits(np.zeros_like(x))[rows, targets]
    relative = np.abs(maps.reshape(len(x), -1).sum(axis=1) - difference) / np.abs(difference)
    assert (relative < 0.01).all(), relative


def test_grad_cam_peak_on_the_mask(shapes: LoadedModel, heldout: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    x, labels, masks = heldout
    x, masks = x[:100], masks[:100]
    predicted = shapes.logits(x).argmax(axis=1).astype(np.int64)
    params = resolve_params(METHODS.get("grad_cam").params, {}, "grad_cam")
    maps = METHODS.get("grad_cam")().attribute(MethodInput(shapes, x, predicted, params, "layer3", 0))
    peaks = maps.reshape(len(x), -1).argmax(axis=1)
    rate = float(np.mean([mask.flat[peak] for mask, peak in zip(masks, peaks, strict=True)]))
    assert rate >= 0.9, rate
