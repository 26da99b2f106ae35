"""The head path: a CAM's backward pass starts from the prediction pass's activation and runs only the layers after it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.engine import Engine, ExplainJob
from saliency_service.core.models.model import LoadedModel, RuntimeOptions
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.types import RawTensor
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate


@pytest.fixture(scope="module")
def shapes() -> LoadedModel:
    return LoadedModel.load(EMBEDDED_REPOSITORY / "shapes")


@pytest.fixture(scope="module")
def x(shapes: LoadedModel) -> torch.Tensor:
    rng = np.random.default_rng(0)
    spec = shapes.config.input
    return torch.from_numpy(rng.standard_normal((3, 3, spec.height, spec.width)).astype(np.float32))


def test_the_last_stage_has_a_head_that_gives_the_programs_logits(shapes: LoadedModel, x: torch.Tensor) -> None:
    logits, activations = shapes.program.forward(x, shapes.program.zero_probes(len(x)))
    spec = shapes.config.layer("layer3")
    head = shapes.program.head(spec.probe_index)
    assert head is not None
    torch.testing.assert_close(head(activations[spec.probe_index]), logits, rtol=0, atol=1e-6)


def test_no_head_where_the_logits_need_more_than_the_activation(shapes: LoadedModel) -> None:
    # layer1 and layer2: the later layers' probes are inputs the activation does not carry.
    assert not shapes.has_head("layer1") and not shapes.has_head("layer2")
    vit = LoadedModel.load(EMBEDDED_REPOSITORY / "vit_shapes")
    # A transformer block's norm: the residual stream bypasses it.
    assert not any(vit.has_head(layer.name) for layer in vit.config.layers)


def test_the_head_gradient_equals_the_full_programs(shapes: LoadedModel, x: torch.Tensor) -> None:
    weights = torch.zeros((len(x), shapes.config.num_classes))
    weights[:, 2] = 1.0
    weights[0, 4] = -1.0  # a contrastive row too
    full_logits, full_activations, full_gradients = shapes.layers_gradient(x, weights, ["layer3"])
    _, onnx_activations = shapes.forward(x.numpy(), ["layer3"])
    logits, activation, gradient = shapes.layer_gradient(x, weights, "layer3", onnx_activations["layer3"])
    torch.testing.assert_close(activation, full_activations["layer3"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gradient, full_gradients["layer3"], rtol=1e-4, atol=1e-6)


def test_without_an_activation_the_trunk_runs_in_onnxruntime(shapes: LoadedModel, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = torch.zeros((len(x), shapes.config.num_classes))
    weights[:, 1] = 1.0
    _, full_activations, full_gradients = shapes.layers_gradient(x, weights, ["layer3"])

    def no_trunk(*args: object) -> None:
        raise AssertionError("the whole torch program ran")

    monkeypatch.setattr(shapes.program, "forward", no_trunk)
    _, activation, gradient = shapes.layer_gradient(x, weights, "layer3")
    torch.testing.assert_close(activation, full_activations["layer3"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gradient, full_gradients["layer3"], rtol=1e-4, atol=1e-6)


def test_the_engine_runs_grad_cam_without_the_trunk_in_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    repository = ModelRepository(EMBEDDED_REPOSITORY, RuntimeOptions())
    repository.load_all()
    engine = Engine(repository)
    images = [generate(HELDOUT_SEED_OFFSET + i).image for i in range(2)]
    job = ExplainJob("shapes", [RawTensor("uint8", image.shape, image.tobytes()) for image in images], "grad_cam")
    model = repository.get("shapes")
    with monkeypatch.context() as patch:
        patch.setattr(model, "has_head", lambda layer: False)
        with_trunk = engine.explain(job)

    def no_trunk(*args: object) -> None:
        raise AssertionError("the whole torch program ran")

    monkeypatch.setattr(model.program, "forward", no_trunk)
    head_only = engine.explain(job)
    for a, b in zip(head_only, with_trunk, strict=True):
        np.testing.assert_allclose(a.saliency, b.saliency, rtol=1e-4, atol=1e-5)
    # A layer without a head still takes the full program.
    with pytest.raises(AssertionError, match="whole torch program"):
        engine.explain(ExplainJob("shapes", job.images, "grad_cam", layer="layer2"))
