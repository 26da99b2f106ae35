"""The device path: onnxruntime's I/O binding, half-precision graphs, and where the torch program runs.

Everything here runs on the CPU; the last test compares the GPU with the CPU and runs only where both
onnxruntime's CUDA provider and a CUDA build of torch are present.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from saliency_service.config import EMBEDDED_REPOSITORY, Settings
from saliency_service.core.errors import FailedPrecondition
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.models.model import LoadedModel, RuntimeOptions, torch_device
from saliency_service.core.models.onnx_runner import OnnxRunner, float16_graph
from saliency_service.core.params import resolve_params
from saliency_service.shapes.generator import generate_batch
from saliency_service.shapes.network import preprocess

SHAPES = EMBEDDED_REPOSITORY / "shapes"


@pytest.fixture(scope="module")
def shapes() -> LoadedModel:
    return LoadedModel.load(SHAPES, RuntimeOptions(max_batch=3, threads=1, prefer_cuda=False))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    pictures, _, _ = generate_batch([910_001 + i for i in range(7)])
    return preprocess(pictures).numpy()


def _explain(model: LoadedModel, method: str, x: np.ndarray, layer: str | None = None) -> np.ndarray:
    cls = METHODS.get(method)
    targets = model.logits(x).argmax(axis=1)
    request = MethodInput(
        model=model,
        x=x,
        targets=targets,
        params=resolve_params(cls.params, {}, method),
        layer=layer,
        seed=0,
        layers=(layer,) if layer else (),
    )
    return cls().attribute(request)


def test_io_binding_gives_what_a_plain_run_gives_in_chunks(shapes: LoadedModel, images: np.ndarray) -> None:
    runner = shapes.onnx
    layer = shapes.config.layer("layer3")
    names = [shapes.config.onnx_logits_output, layer.onnx_output]
    plain = runner.run(images, names)
    bound = runner.run_tensors(torch.from_numpy(images), names, [(shapes.config.num_classes,), layer.raw_shape])
    assert runner.max_batch < len(images), "seven images in chunks of three: the binding is redone per chunk"
    for expected, got in zip(plain, bound, strict=True):
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        np.testing.assert_array_equal(got.numpy(), expected)
    assert float(np.abs(plain[0]).max()) > 1.0


def test_io_binding_reads_a_view_where_it_lies_and_checks_its_arguments(shapes: LoadedModel, images: np.ndarray) -> None:
    # A strided view (every other image) is made contiguous before its address is bound.
    view = torch.from_numpy(images)[::2]
    logits = shapes.logits_tensor(view)
    np.testing.assert_array_equal(logits.numpy(), shapes.logits(images[::2]))
    with pytest.raises(ValueError, match="2 outputs but 1 shapes"):
        shapes.onnx.run_tensors(view, ["logits", "x"], [(4,)])


def test_float16_graph_halves_the_weights_and_keeps_float32_at_its_edges() -> None:
    original = onnx.load(str(SHAPES / "model.onnx"))
    half = onnx.load_from_string(float16_graph(SHAPES / "model.onnx"))
    float_weights = [t for t in original.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert len(float_weights) > 10
    kinds = {t.name: t.data_type for t in half.graph.initializer}
    assert all(kinds.get(t.name) == onnx.TensorProto.FLOAT16 for t in float_weights)
    for edge in [*half.graph.input, *half.graph.output]:
        assert edge.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, edge.name


def test_a_float16_model_loads_and_stays_close_to_float32(shapes: LoadedModel, images: np.ndarray) -> None:
    half = LoadedModel.load(SHAPES, RuntimeOptions(max_batch=3, threads=1, prefer_cuda=False, float16=True))
    assert half.onnx.float16 and not shapes.onnx.float16
    full, low = shapes.logits(images), half.logits(images)
    assert low.dtype == np.float32
    difference = np.abs(low - full).max()
    assert 0 < difference < 1e-2 * np.abs(full).max(), "half precision changes the logits, a little"
    np.testing.assert_array_equal(low.argmax(axis=1), full.argmax(axis=1))
    bound = half.logits_tensor(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(bound, low, rtol=0, atol=1e-5)
    # Score-CAM's every pass goes through the half-precision graph; its map barely moves.
    a, b = _explain(shapes, "score_cam", images[:2], "layer3"), _explain(half, "score_cam", images[:2], "layer3")
    assert np.abs(a - b).max() < 0.05
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_float16_tolerance_is_relative_to_the_logits(shapes: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    half = LoadedModel.load(SHAPES, RuntimeOptions(threads=1, prefer_cuda=False, float16=True))
    # The same gap with float32 graphs is refused at the config's 1e-3.
    half.onnx.float16 = False
    with pytest.raises(FailedPrecondition, match="ONNX and torch logits differ"):
        half.check_agreement()
    half.onnx.float16 = True
    assert half.check_agreement() > shapes.config.logits_tolerance


def test_torch_follows_onnxruntime_to_the_gpu_only_when_it_can(monkeypatch: pytest.MonkeyPatch, shapes: LoadedModel) -> None:
    assert shapes.device == torch.device("cpu") and shapes.program.device == torch.device("cpu")
    gpu, cpu = SimpleNamespace(device="cuda"), SimpleNamespace(device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device(gpu) == "cuda"  # type: ignore[arg-type]
    assert torch_device(cpu) == "cpu"  # type: ignore[arg-type]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device(gpu) == "cpu"  # type: ignore[arg-type]


def test_settings_reach_the_runtime_options() -> None:
    settings = Settings.load(env={"SALIENCY_FLOAT16": "true", "SALIENCY_PREFER_CUDA": "false", "SALIENCY_ONNX_MAX_BATCH": "12"})
    assert RuntimeOptions.from_settings(settings) == RuntimeOptions(max_batch=12, threads=0, prefer_cuda=False, float16=True)
    assert RuntimeOptions.from_settings(Settings()).float16 is False


GPU = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


@pytest.mark.skipif(not GPU, reason="needs onnxruntime's CUDA provider and a CUDA build of torch")
@pytest.mark.parametrize(
    ("method", "layer"), [("grad_cam", "layer3"), ("score_cam", "layer3"), ("integrated_gradients", None), ("lrp", None)]
)
def test_the_gpu_gives_the_cpu_maps(shapes: LoadedModel, images: np.ndarray, method: str, layer: str | None) -> None:
    gpu = LoadedModel.load(SHAPES, RuntimeOptions(max_batch=3, prefer_cuda=True))
    assert gpu.onnx.device == "cuda" and gpu.device.type == "cuda"
    on_gpu, on_cpu = _explain(gpu, method, images[:4], layer), _explain(shapes, method, images[:4], layer)
    scale = np.abs(on_cpu).max()
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=0, atol=1e-3 * scale)


def test_onnx_runner_reports_its_device(shapes: LoadedModel) -> None:
    assert isinstance(shapes.onnx, OnnxRunner)
    assert shapes.onnx.device == "cpu" and shapes.onnx.providers == ["CPUExecutionProvider"]
