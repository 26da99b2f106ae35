"""On a GPU a method's tensors stay on the device until `attribute` hands its maps to the engine.

There is no GPU here, so the test watches for what would move data off one: every call that reads a
tensor's values into host memory (`numpy`, `cpu`, `tolist`, `item`, `__array__`, `float(t)`, `int(t)`,
`bool(t)`, `.to("cpu")`). A method written for any device makes none of them on more than one element
between its input and its maps; reading one element (a count, a flag for control flow) is a sync, not a
transfer of results, and is allowed. The methods listed in HOST_METHODS do part of their work on the
host by design, each for the reason given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from saliency_service.core.engine import Engine, ExplainJob
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.methods.base import on_host
from saliency_service.core.models.model import LoadedModel, RuntimeOptions
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.params import resolve_params
from saliency_service.core.types import RawTensor

HOST_READS = {"numpy", "cpu", "tolist", "item", "__array__", "__float__", "__int__", "__index__", "__bool__"}

HOST_METHODS = {
    "cf_cam": "DBSCAN clusters each item's channels with numpy and scipy",
    "lp_cam": "the prototypes and their k-means live in numpy files",
    "salient_relevance": "context-aware saliency's distance transform is scipy's",
    "random": "seeded from each image's bytes; no model pass",
}


class HostReads(TorchFunctionMode):
    """Records (call, element count) for every read of a tensor's values into host memory."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, int]] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(arg == "cpu" for arg in (*args[1:], *kwargs.values()) if isinstance(arg, str))
        if (name in HOST_READS or to_host) and args and isinstance(args[0], torch.Tensor):
            self.reads.append((name, args[0].numel()))
        return func(*args, **kwargs)

    def transfers(self) -> list[tuple[str, int]]:
        return [(name, count) for name, count in self.reads if count > 1]


def _request(model: LoadedModel, method: str, x: np.ndarray, **params: object) -> MethodInput:
    cls = METHODS.get(method)
    return MethodInput(
        model=model,
        x=x,
        targets=np.array([0, 2], dtype=np.int64),
        params=resolve_params(cls.params, dict(params), method),
        layer=model.config.default_layer if cls.uses_layer else None,
        seed=3,
    )


def _input(model: LoadedModel) -> np.ndarray:
    spec = model.config.input
    return np.random.default_rng(4).standard_normal((2, spec.channels, spec.height, spec.width)).astype(np.float32)


def test_the_spy_sees_a_host_read() -> None:
    """The check below could fail: a `.numpy()` of a map, or a `.cpu()`, is caught; a scalar read is not counted."""
    with HostReads() as spy:
        maps = torch.ones((2, 4, 4))
        maps.cpu()
        maps.numpy()
        float(maps.sum())
        maps.to("cpu")
    assert spy.transfers() == [("cpu", 32), ("numpy", 32), ("to", 32)]


DEVICE_CASES = [(name, {}) for name in METHODS.names() if name not in HOST_METHODS] + [
    ("integrated_gradients", {"noise": "smoothgrad", "noise_samples": 3}),
    ("saliency", {"noise": "vargrad", "noise_samples": 3}),
    ("integrated_gradients", {"baseline": "blur", "steps": 4}),
    ("integrated_gradients", {"baseline": "uniform", "steps": 4}),
    ("score_cam", {"score": "probability"}),
    ("ablation_cam", {"channel_ratio": 0.5}),
    ("occlusion", {"window": 8, "stride": 8, "fill": "blur"}),
    ("occlusion", {"window": 8, "stride": 8, "fill": "mean"}),
    ("rise", {"masks": 40, "score": "logit"}),
]


def test_every_method_is_either_device_resident_or_says_why_not() -> None:
    assert set(HOST_METHODS) <= set(METHODS.names())
    assert {name for name, _ in DEVICE_CASES} | set(HOST_METHODS) == set(METHODS.names())


@pytest.mark.parametrize(("method", "params"), DEVICE_CASES, ids=lambda case: case if isinstance(case, str) else str(case or ""))
def test_a_method_keeps_its_tensors_on_the_models_device(method: str, params: dict[str, object], tiny_cnn: Any) -> None:
    model = tiny_cnn.model
    request = _request(model, method, _input(model), **params)
    instance = METHODS.get(method)()

    with HostReads() as spy:
        maps = instance.maps(request)

    assert spy.transfers() == []
    assert isinstance(maps, torch.Tensor) and maps.device == model.device
    np.testing.assert_array_equal(on_host(maps), instance.attribute(request))


def test_a_layer_attribution_keeps_its_tensors_on_the_device(tiny_cnn: Any) -> None:
    """Layer IG's activations come from an onnxruntime pass bound to tensors, not from a host array."""
    model = tiny_cnn.model
    request = _request(model, "integrated_gradients", _input(model), steps=4)
    request = dataclasses.replace(request, layer=model.config.default_layer)
    with HostReads() as spy:
        maps = METHODS.get("integrated_gradients")().maps(request)
    assert spy.transfers() == []
    assert isinstance(maps, torch.Tensor)


def test_the_prediction_pass_leaves_the_layer_activations_on_the_device(tiny_cnn: Any) -> None:
    """`predict` is `forward` with its activations kept as tensors where the model runs (bound by onnxruntime)."""
    model = tiny_cnn.model
    x, layer = _input(model), model.config.default_layer
    logits, activations = model.predict(x, [layer])
    host_logits, host_activations = model.forward(x, [layer])
    assert isinstance(logits, np.ndarray)
    np.testing.assert_array_equal(logits, host_logits)
    assert isinstance(activations[layer], torch.Tensor) and activations[layer].device == model.device
    np.testing.assert_array_equal(activations[layer].numpy(), host_activations[layer])


def test_the_engine_hands_a_cam_its_prediction_activations_as_device_tensors(
    tiny_cnn: Any, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = ModelRepository(repository, RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False))
    models.load_all()
    seen: list[MethodInput] = []
    cam = METHODS.get("grad_cam")
    original = cam.maps

    def recording(self: Any, request: MethodInput) -> Any:
        seen.append(request)
        return original(self, request)

    monkeypatch.setattr(cam, "maps", recording)
    spec = tiny_cnn.model.config.input
    image = np.random.default_rng(2).integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8)
    Engine(models).explain(ExplainJob("tiny-cnn", [RawTensor("uint8", image.shape, image.tobytes())], "grad_cam"))
    (request,) = seen
    cached = request.cached_activation(tiny_cnn.model.config.default_layer)
    assert isinstance(cached, torch.Tensor) and cached.device == request.model.device
