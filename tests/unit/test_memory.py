"""A batch that would not fit in memory is split into passes that fit, not failed (core/models/memory.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from saliency_service.config import EMBEDDED_REPOSITORY, Settings
from saliency_service.core.errors import ResourceExhausted
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.models import memory
from saliency_service.core.models.memory import PASS_OVERHEAD, activation_bytes, fitted_batch, is_out_of_memory
from saliency_service.core.models.model import CPU_GRADIENT_BATCH, LoadedModel, RuntimeOptions
from saliency_service.core.params import resolve_params
from saliency_service.shapes.generator import generate_batch
from saliency_service.shapes.network import preprocess

SHAPES = EMBEDDED_REPOSITORY / "shapes"
ORT_OUT_OF_MEMORY = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. Name:'conv' "
    "Status Message: bfc_arena.cc:359 AllocateRawInternal Failed to allocate memory for requested buffer of size 8388608"
)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    pictures, _, _ = generate_batch([920_001 + i for i in range(7)])
    return preprocess(pictures).numpy()


def test_activation_bytes_counts_what_each_op_makes_and_not_views() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    made = activation_bytes(net, torch.zeros((1, 3, 10, 10)))
    # conv 8x10x10 and relu 8x10x10 floats, the flatten is a view, the linear 5 floats.
    assert made == 4 * (800 + 800 + 5)
    assert activation_bytes(net, torch.zeros((2, 3, 10, 10))) == 2 * made


def test_fitted_batch_is_the_largest_chunk_that_fits() -> None:
    item = 1000
    assert fitted_batch(64, 10 * PASS_OVERHEAD * item, item) == 10
    assert fitted_batch(64, 10 * PASS_OVERHEAD * item - 1, item) == 9
    assert fitted_batch(8, 10**12, item) == 8, "never above the configured batch"
    assert fitted_batch(64, 1, item) == 1, "one item at a time at the least: split, never refused"
    assert fitted_batch(64, 1, 0) == 64


def test_memory_limit_reads_the_cgroup_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(memory, "_CGROUP_FILES", (limit,))
    physical = memory.memory_limit_bytes()
    assert physical > 2**28, "no cgroup file: the machine's RAM"
    limit.write_text("max\n")
    assert memory.memory_limit_bytes() == physical
    limit.write_text("1073741824\n")
    assert memory.memory_limit_bytes() == 2**30
    assert memory.default_budget(torch.device("cpu")) == 2**30 // memory.BUDGET_SHARE


def _explain(model: LoadedModel, method: str, x: np.ndarray, layer: str | None = None) -> np.ndarray:
    cls = METHODS.get(method)
    targets = model.logits(x).argmax(axis=1)
    params = resolve_params(cls.params, {"steps": 8} if method == "integrated_gradients" else {}, method)
    request = MethodInput(model=model, x=x, targets=targets, params=params, layer=layer, seed=0, layers=(layer,) if layer else ())
    return cls().attribute(request)


class _Recording:
    """An onnxruntime session that notes how many items each run gets, by either way in (plain or I/O binding)."""

    def __init__(self, session: Any) -> None:
        self.session, self.sizes = session, []

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> Any:
        self.sizes.append(len(next(iter(feed.values()))))
        return self.session.run(outputs, feed)

    def io_binding(self) -> Any:
        binding, sizes = self.session.io_binding(), self.sizes

        class Noting:
            def bind_input(self, *args: Any) -> None:
                sizes.append(args[4][0])  # (name, device type, device id, element type, shape, address)
                binding.bind_input(*args)

            def bind_output(self, *args: Any) -> None:
                binding.bind_output(*args)

        noting = Noting()
        noting.binding = binding  # type: ignore[attr-defined]
        return noting

    def run_with_iobinding(self, noting: Any) -> None:
        self.session.run_with_iobinding(noting.binding)


@pytest.mark.parametrize(("method", "layer"), [("grad_cam", "layer3"), ("integrated_gradients", None), ("score_cam", "layer3")])
def test_a_small_budget_splits_every_pass_and_changes_no_map(images: np.ndarray, method: str, layer: str | None) -> None:
    roomy = LoadedModel.load(SHAPES, RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False))
    assert roomy.max_batch == 64 and roomy.item_bytes > 2**20
    backward: list[int] = []
    budget = 3 * PASS_OVERHEAD * roomy.item_bytes + 1
    tight = LoadedModel.load(
        SHAPES,
        RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False, pass_memory_bytes=budget),
        observer=lambda model, kind, batch: backward.append(batch) if kind == "backward" else None,
    )
    assert tight.max_batch == 3 and tight.pass_budget == budget
    recording = _Recording(tight.onnx.session)
    tight.onnx.session = recording
    split, whole = _explain(tight, method, images, layer), _explain(roomy, method, images, layer)
    passes = recording.sizes + backward
    assert max(passes) == 3, passes
    assert sum(recording.sizes) >= len(images), "the seven images went through onnxruntime in passes of three"
    if method != "score_cam":
        assert backward and sum(backward) >= len(images)
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-5 * max(1.0, float(np.abs(whole).max())))


def test_on_the_cpu_gradient_passes_take_a_few_items_and_give_the_same_gradients(images: np.ndarray) -> None:
    """`CPU_GRADIENT_BATCH` splits a trunk backward (IG's path batch here) finer than the memory would; the sums do not care."""
    backward: list[int] = []
    model = LoadedModel.load(
        SHAPES,
        RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False),
        observer=lambda model, kind, batch: backward.append(batch) if kind == "backward" else None,
    )
    assert model.max_batch == 64 and model.gradient_batch == CPU_GRADIENT_BATCH < 64
    x = torch.from_numpy(np.concatenate([images, images, images]))  # 21 items
    weights = torch.zeros((len(x), model.config.num_classes))
    weights[:, 1] = 1.0
    logits, gradient = model.input_gradient(x, weights)
    assert backward == [8, 8, 5]
    with torch.enable_grad():
        whole = x.clone().requires_grad_(True)
        reference, _ = model.program.forward(whole, model.program.zero_probes(len(x)))
        (expected,) = torch.autograd.grad(reference[:, 1].sum(), whole)
    np.testing.assert_allclose(logits.numpy(), reference.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gradient.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


class _Scarce:
    """An onnxruntime session that runs out of memory on more than `fits` items (as its arena reports it)."""

    def __init__(self, session: Any, fits: int) -> None:
        self.session, self.fits, self.sizes = session, fits, []

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> Any:
        size = len(next(iter(feed.values())))
        self.sizes.append(size)
        if size > self.fits:
            raise RuntimeError(ORT_OUT_OF_MEMORY)
        return self.session.run(outputs, feed)


def test_a_pass_that_runs_out_of_memory_is_halved_and_run_again(images: np.ndarray) -> None:
    model = LoadedModel.load(SHAPES, RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False))
    expected = model.logits(images)
    scarce = _Scarce(model.onnx.session, fits=2)
    model.onnx.session = scarce
    np.testing.assert_array_equal(model.logits(images), expected)
    assert scarce.sizes == [7, 4, 2, 2, 2, 1] and model.max_batch == 2
    scarce.sizes.clear()
    model.logits(images)
    assert max(scarce.sizes) <= 2, "later calls start from the smaller chunk"
    scarce.fits = 0
    with pytest.raises(ResourceExhausted, match="one item does not fit in memory") as caught:
        model.logits(images[:1])
    assert caught.value.reason == "OUT_OF_MEMORY"


def test_out_of_memory_is_told_from_other_errors() -> None:
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError(ORT_OUT_OF_MEMORY))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 1")
    )
    assert not is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input"))
    assert not is_out_of_memory(ValueError("shape mismatch"))


def test_the_setting_reaches_the_runtime_options() -> None:
    settings = Settings.load(env={"SALIENCY_PASS_MEMORY_MB": "512"})
    assert RuntimeOptions.from_settings(settings).pass_memory_bytes == 512 * 2**20
    assert RuntimeOptions.from_settings(Settings()).pass_memory_bytes == 0
