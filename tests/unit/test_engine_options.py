"""Options every map-making request shares: a foil (contrast class), several layers, supplied baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saliency_service.core.engine import Engine, ExplainJob, combine_layers
from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.methods.cam import postprocess_cam
from saliency_service.core.models.model import RuntimeOptions
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.types import RawTensor, TargetRequest

from .conftest import ModelCase


@pytest.fixture(scope="module")
def engine(tiny_cnn: ModelCase, repository: Path) -> Engine:
    models = ModelRepository(repository, RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False))
    models.load_all()
    return Engine(models)


def _images(count: int, height: int, width: int, seed: int = 0) -> list[RawTensor]:
    rng = np.random.default_rng(seed)
    return [
        RawTensor("uint8", (height, width, 3), rng.integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes()) for _ in range(count)
    ]


def _x(tiny_cnn: ModelCase, count: int) -> np.ndarray:
    spec = tiny_cnn.model.config.input
    return np.random.default_rng(4).standard_normal((count, 3, spec.height, spec.width)).astype(np.float32)


def test_objective_puts_plus_one_on_the_target_and_minus_one_on_the_foil(tiny_cnn: ModelCase) -> None:
    request = MethodInput(tiny_cnn.model, _x(tiny_cnn, 2), np.array([0, 3]), {}, None, 0, foils=np.array([2, 1]))
    expected = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 1.0]])
    assert torch.equal(request.objective(), expected)
    logits = np.array([[5.0, 1.0, 2.0, 0.0], [0.0, 4.0, 0.0, 1.5]])
    np.testing.assert_allclose(request.objective_of(logits), [3.0, -2.5])
    # Perturbation batches map rows to items.
    np.testing.assert_allclose(request.objective_of(logits[[1, 1]], np.array([0, 1])), [0.0 - 0.0, -2.5])


def test_grad_cam_with_a_foil_is_grad_cam_of_the_logit_difference(tiny_cnn: ModelCase) -> None:
    model = tiny_cnn.model
    x = _x(tiny_cnn, 2)
    targets, foils = np.array([0, 3]), np.array([2, 1])
    ours = METHODS.get("grad_cam")().attribute(MethodInput(model, x, targets, {}, "features", 0, foils=foils))

    # By hand on the original module: d(logit_t - logit_f)/dA at `features`, channel means, weighted sum.
    module = tiny_cnn.module
    inputs = torch.from_numpy(x)
    with torch.enable_grad():
        activation = module.features(module.stem(inputs))
        activation.retain_grad()
        logits = module.head(module.mix(activation).flatten(1))
        rows = torch.arange(2)
        (logits[rows, torch.from_numpy(targets)] - logits[rows, torch.from_numpy(foils)]).sum().backward()
    assert activation.grad is not None
    cam = (activation.grad.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1).detach()
    spec = model.config.input
    np.testing.assert_allclose(ours, postprocess_cam(cam, spec.height, spec.width), atol=1e-5)
    plain = METHODS.get("grad_cam")().attribute(MethodInput(model, x, targets, {}, "features", 0))
    assert not np.allclose(ours, plain, atol=1e-3), "the foil must change the map"


def test_engine_resolves_a_foil_by_label_and_reports_it(engine: Engine, tiny_cnn: ModelCase) -> None:
    spec = tiny_cnn.model.config.input
    images = _images(2, spec.height, spec.width)
    job = ExplainJob("tiny-cnn", images, "grad_cam", target=TargetRequest(label="circle"), foil=TargetRequest(label="star"))
    explanations = engine.explain(job)
    provenance = explanations[0].provenance
    assert (provenance.foil, provenance.foil_label) == (2, "star")
    plain = engine.explain(ExplainJob("tiny-cnn", images, "grad_cam", target=TargetRequest(label="circle")))
    assert plain[0].provenance.foil is None
    assert not np.allclose(explanations[0].saliency, plain[0].saliency, atol=1e-3)


def test_a_foil_equal_to_the_predicted_class_names_the_image(engine: Engine, tiny_cnn: ModelCase) -> None:
    spec = tiny_cnn.model.config.input
    images = _images(3, spec.height, spec.width, seed=1)
    predicted = [e.predicted for e in engine.explain(ExplainJob("tiny-cnn", images, "grad_cam"))]
    with pytest.raises(InvalidArgument) as error:
        engine.explain(ExplainJob("tiny-cnn", images, "grad_cam", foil=TargetRequest(class_index=predicted[2])))
    assert error.value.reason == "FOIL_IS_TARGET"
    assert error.value.metadata["image_index"] == str(predicted.index(predicted[2]))


def test_several_layers_give_per_layer_maps_and_their_scaled_average(engine: Engine, tiny_cnn: ModelCase) -> None:
    spec = tiny_cnn.model.config.input
    images = _images(2, spec.height, spec.width, seed=2)
    both = engine.explain(ExplainJob("tiny-cnn", images, "grad_cam", layers=["stem", "features"]))
    for layer in ("stem", "features"):
        alone = engine.explain(ExplainJob("tiny-cnn", images, "grad_cam", layer=layer))
        for combined, single in zip(both, alone, strict=True):
            np.testing.assert_allclose(combined.layer_maps[layer], single.saliency, atol=1e-6)
    first = both[0]
    assert list(first.layer_maps) == ["stem", "features"]
    assert first.provenance.layers == ("stem", "features") and first.provenance.layer == "stem"
    expected = combine_layers([first.layer_maps["stem"][None], first.layer_maps["features"][None]])[0]
    np.testing.assert_allclose(first.saliency, expected, atol=1e-6)
    one = engine.explain(ExplainJob("tiny-cnn", images, "grad_cam", layer="features"))
    assert one[0].layer_maps == {} and one[0].provenance.layers == ("features",)


def test_combine_layers_scales_each_map_by_its_peak_and_keeps_zero_maps_zero() -> None:
    a = np.array([[[2.0, -4.0]]], dtype=np.float32)
    b = np.array([[[0.5, 0.25]]], dtype=np.float32)
    zero = np.zeros((1, 1, 2), dtype=np.float32)
    np.testing.assert_allclose(combine_layers([a, b]), [[[(0.5 + 1.0) / 2, (-1.0 + 0.5) / 2]]])
    np.testing.assert_allclose(combine_layers([a, zero]), [[[0.25, -0.5]]])


def test_logits_with_a_delta_at_a_layer(tiny_cnn: ModelCase) -> None:
    model = tiny_cnn.model
    x = _x(tiny_cnn, 3)
    logits, activations = model.forward(x, ["features"])
    inputs = torch.from_numpy(x)
    unchanged = model.logits_with_delta(inputs, "features", torch.zeros_like(torch.from_numpy(activations["features"])))
    np.testing.assert_allclose(unchanged.numpy(), logits, atol=1e-4)
    # Zeroing channel 0 at `features` equals running the rest of the module on the ablated activation.
    delta = torch.zeros_like(torch.from_numpy(activations["features"]))
    delta[:, 0] = -torch.from_numpy(activations["features"][:, 0])
    ablated = model.logits_with_delta(inputs, "features", delta)
    module = tiny_cnn.module
    with torch.no_grad():
        activation = module.features(module.stem(inputs))
        activation[:, 0] = 0
        expected = module.head(module.mix(activation).flatten(1))
    np.testing.assert_allclose(ablated.numpy(), expected.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        (ExplainJob("tiny-cnn", [], "grad_cam", layer="stem", layers=["features"]), "AMBIGUOUS_LAYERS"),
        (ExplainJob("tiny-cnn", [], "grad_cam", layers=["stem", "stem"]), "DUPLICATE_LAYER"),
        (ExplainJob("tiny-cnn", [], "occlusion", layers=["stem"]), "LAYER_NOT_USED"),
        (ExplainJob("tiny-cnn", [], "eigen_cam", foil=TargetRequest(class_index=1)), "FOIL_NOT_SUPPORTED"),
        (ExplainJob("tiny-cnn", [], "grad_cam", baselines=_images(1, 4, 4)), "BASELINE_NOT_USED"),
    ],
)
def test_option_errors_are_invalid_argument_before_any_compute(engine: Engine, job: ExplainJob, reason: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        engine.explain(job)
    assert error.value.reason == reason
