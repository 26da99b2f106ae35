"""One contract test for every registered method: shape, dtype, finite, deterministic, batch == per item, no state left."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.methods.lp_cam import build_prototypes, prototype_file
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import resolve_params

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _request(model: LoadedModel, method: str, x: np.ndarray, targets: np.ndarray, seed: int) -> MethodInput:
    cls = METHODS.get(method)
    return MethodInput(
        model=model,
        x=x,
        targets=targets,
        params=resolve_params(cls.params, {}, method),
        layer=model.config.default_layer if cls.uses_layer else None,
        seed=seed,
    )


def _module_state(model: LoadedModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.program.module.state_dict().items()}


def _hooks(model: LoadedModel) -> dict[tuple[str, str], list[int]]:
    """Every hook registry on every submodule, by handle id.

    torch.export installs one forward hook of its own on the program's root (its guard check),
    so the check is "nothing added or removed", not "empty".
    """
    return {
        (name, kind): list(getattr(submodule, kind, {}).keys())
        for name, submodule in model.program.module.named_modules()
        for kind in _HOOK_DICTS
    }


def _ensure_lp_cam_prototypes(model: LoadedModel) -> None:
    """LP-CAM reads prototypes built once per model: build them for the model's default layer from seeded random images."""
    layer = model.config.default_layer
    assert model.folder is not None and layer is not None
    if not prototype_file(model.folder, layer).is_file():
        spec = model.config.input
        images = np.random.default_rng(3).standard_normal((24, 3, spec.height, spec.width)).astype(np.float32)
        labels = np.arange(24) % model.config.num_classes
        build_prototypes(model, images, layer, k=3, labels=labels).save(prototype_file(model.folder, layer))


@pytest.mark.parametrize("model_fixture", ["tiny_cnn", "tiny_vit"])
@pytest.mark.parametrize("method", METHODS.names())
def test_method_contract(method: str, model_fixture: str, request: pytest.FixtureRequest) -> None:
    """tiny_cnn: a convolutional model; tiny_vit: a ViT whose layers are token layers (class + register prefix)."""
    model = request.getfixturevalue(model_fixture).model
    if method == "lp_cam":
        _ensure_lp_cam_prototypes(model)
    spec = model.config.input
    x = np.random.default_rng(11).standard_normal((3, 3, spec.height, spec.width)).astype(np.float32)
    targets = np.array([0, 2, 3], dtype=np.int64)
    before, hooks_before = _module_state(model), _hooks(model)
    modes_before = [m.training for m in model.program.module.modules()]
    instance = METHODS.get(method)()

    maps = instance.attribute(_request(model, method, x, targets, seed=5))

    assert maps.shape == (3, spec.height, spec.width)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert not np.all(maps == 0), "a random image on a random model should give some signal"

    again = instance.attribute(_request(model, method, x, targets, seed=5))
    np.testing.assert_array_equal(maps, again, err_msg="same input and seed must give the same maps")

    scale = float(np.abs(maps).max())
    for item in range(3):
        alone = instance.attribute(_request(model, method, x[item : item + 1], targets[item : item + 1], seed=5))
        np.testing.assert_allclose(alone[0], maps[item], rtol=1e-4, atol=1e-5 * scale, err_msg=f"item {item} differs alone vs in a batch")

    module = model.program.module
    after = _module_state(model)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"{name} changed"
    for name, parameter in module.named_parameters():
        assert not parameter.requires_grad, f"{name} requires grad after {method}"
        assert parameter.grad is None, f"{name} has a .grad after {method}"
    assert [m.training for m in module.modules()] == modes_before, f"{method} switched train/eval mode"
    assert _hooks(model) == hooks_before, f"{method} added or removed hooks on the shared module"
    assert torch.is_grad_enabled(), f"{method} left global grad mode off"
