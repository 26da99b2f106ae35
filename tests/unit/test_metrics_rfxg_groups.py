"""RFxG's group scores (METRICS.md §7): known answers, a recomputation by hand, and the refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.errors import FailedPrecondition, InvalidArgument
from saliency_service.core.images import to_model_input
from saliency_service.core.metrics import METRICS, MetricInput
from saliency_service.core.models.config import ModelConfig
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import resolve_params
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate

ALPHAS = np.arange(1, 10) / 10
GROUP_METRICS = ("group_faithfulness", "class_in_group", "group_contrast")


@pytest.fixture(scope="module")
def shapes() -> LoadedModel:
    return LoadedModel.load(EMBEDDED_REPOSITORY / "shapes")


@pytest.fixture(scope="module")
def samples() -> list[Any]:
    return [generate(HELDOUT_SEED_OFFSET + 300 + i) for i in range(4)]


def _request(model: Any, x: np.ndarray, saliency: np.ndarray, targets: np.ndarray, metric: str, foils: np.ndarray | None) -> MetricInput:
    params = resolve_params(METRICS.get(metric).params, {}, metric)
    return MetricInput(model, x, saliency, targets, params, 0, foils=foils)


class _Blind:
    """A model that ignores its input: the same logits for every image."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.row = np.linspace(-1.0, 2.0, config.num_classes).astype(np.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.tile(self.row, (len(x), 1))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("metric", GROUP_METRICS)
def test_a_model_that_ignores_its_input_scores_zero(metric: str, shapes: LoadedModel, samples: list[Any]) -> None:
    x = to_model_input([s.image for s in samples], shapes.config.input)
    saliency = np.random.default_rng(0).random((len(x), 128, 128)).astype(np.float32)
    targets, foils = np.array([0, 2, 3, 5]), np.array([2, 3, 5, 0])
    for value in METRICS.get(metric)().score(_request(_Blind(shapes.config), x, saliency, targets, metric, foils)):
        assert value.value == pytest.approx(0.0, abs=1e-12)
        assert value.curve.shape == (9,) and np.allclose(value.curve_x, ALPHAS)


@pytest.mark.parametrize("metric", GROUP_METRICS)
def test_the_curve_is_the_formula_on_hand_masked_images(metric: str, shapes: LoadedModel, samples: list[Any]) -> None:
    x = to_model_input([s.image for s in samples], shapes.config.input)
    saliency = np.stack([s.mask.astype(np.float32) + 0.01 * np.random.default_rng(i).random((128, 128)) for i, s in enumerate(samples)])
    targets = shapes.logits(x).argmax(axis=1)
    foils = np.array([(t + 2) % 6 for t in targets])  # always in another group of `shapes`
    values = METRICS.get(metric)().score(_request(shapes, x, saliency, targets, metric, foils))
    groups = {name: [shapes.config.labels.index(m) for m in members] for name, members in shapes.config.groups.items()}
    group_of = {k: members for members in groups.values() for k in members}
    for item, value in enumerate(values):
        order = np.argsort(-saliency[item].ravel(), kind="stable")
        clean = _softmax(shapes.logits(x[item : item + 1]).astype(np.float64))[0]
        curve = []
        for alpha in ALPHAS:
            masked = x[item].reshape(3, -1).copy()
            masked[:, order[: int(np.floor(alpha * 128 * 128))]] = 0.0
            p = _softmax(shapes.logits(masked.reshape(1, 3, 128, 128)).astype(np.float64))[0]
            own = group_of[int(targets[item])]
            if metric == "group_faithfulness":
                curve.append(np.mean(clean[own] - p[own]))
            elif metric == "class_in_group":
                curve.append((np.mean(p[own] - clean[own]) + p[targets[item]] - clean[targets[item]]) / 2)
            else:
                other = group_of[int(foils[item])]
                curve.append((np.mean(p[own] - clean[own]) - np.mean(p[other] - clean[other])) / 2)
        np.testing.assert_allclose(value.curve, curve, atol=1e-6)
        assert value.value == pytest.approx(np.trapezoid(curve, ALPHAS) / 0.8, abs=1e-6)


def test_removing_the_object_costs_its_group_more_than_removing_the_background(shapes: LoadedModel, samples: list[Any]) -> None:
    x = to_model_input([s.image for s in samples], shapes.config.input)
    good = np.stack([s.mask.astype(np.float32) for s in samples])
    targets = shapes.logits(x).argmax(axis=1)
    metric = METRICS.get("group_faithfulness")()
    on_object = [v.value for v in metric.score(_request(shapes, x, good, targets, "group_faithfulness", None))]
    on_background = [v.value for v in metric.score(_request(shapes, x, 1.0 - good, targets, "group_faithfulness", None))]
    assert np.mean(on_object) > np.mean(on_background) + 0.1, (on_object, on_background)


def test_refusals(shapes: LoadedModel, samples: list[Any]) -> None:
    x = to_model_input([samples[0].image], shapes.config.input)
    saliency = np.ones((1, 128, 128), np.float32)
    ungrouped = _Blind(dataclasses.replace(shapes.config, groups={}))
    with pytest.raises(FailedPrecondition) as no_groups:
        METRICS.get("group_faithfulness")().score(_request(ungrouped, x, saliency, np.array([0]), "group_faithfulness", None))
    assert no_groups.value.reason == "MODEL_HAS_NO_GROUPS"
    partial = _Blind(dataclasses.replace(shapes.config, groups={"rounded": ("circle", "heart")}))
    with pytest.raises(InvalidArgument) as outside:
        METRICS.get("class_in_group")().score(_request(partial, x, saliency, np.array([1]), "class_in_group", None))
    assert outside.value.reason == "CLASS_IN_NO_GROUP" and "square" in outside.value.message
    with pytest.raises(InvalidArgument) as no_foil:
        METRICS.get("group_contrast")().score(_request(shapes, x, saliency, np.array([0]), "group_contrast", None))
    assert no_foil.value.reason == "FOIL_REQUIRED"


@pytest.mark.parametrize("groups", [{"odd": ["circle", "hexagon"]}, {"twice": ["star", "star"]}, {"empty": []}, ["circle"]])
def test_bad_groups_make_the_config_invalid(groups: object, tmp_path: Path) -> None:
    shutil.copytree(EMBEDDED_REPOSITORY / "shapes", tmp_path / "shapes", ignore=shutil.ignore_patterns("*.onnx", "*.pt2", "*.npz"))
    config = json.loads((tmp_path / "shapes" / "config.json").read_text())
    config["groups"] = groups
    (tmp_path / "shapes" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FailedPrecondition) as caught:
        ModelConfig.load(tmp_path / "shapes")
    assert caught.value.reason == "MODEL_CONFIG_INVALID"
