"""Model repository: export writes a loadable entry; broken entries are NOT READY with a reason."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from saliency_service.core.errors import FailedPrecondition, InvalidArgument, NotFound
from saliency_service.core.models.config import ModelConfig
from saliency_service.core.models.export import export_model
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.models.torch_runner import vet_pt2_archive


@pytest.fixture()
def repo_copy(tiny_cnn: Any, repository: Path, tmp_path: Path) -> Path:
    """A private repository holding a good copy of the tiny CNN, free to corrupt."""
    root = tmp_path / "repo"
    shutil.copytree(repository / "tiny-cnn", root / "tiny-cnn")
    return root


def _clone(root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(root / "tiny-cnn", folder)
    config = json.loads((folder / "config.json").read_text())
    config["name"] = name
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_export_writes_config_onnx_and_torch_program(tiny_cnn: Any, repository: Path) -> None:
    folder = repository / "tiny-cnn"
    # Method data other tests may add (LP-CAM prototypes) aside, export writes exactly these three files.
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("lp_cam_")) == ["config.json", "model.onnx", "model.pt2"]
    config = ModelConfig.load(folder)
    assert [layer.name for layer in config.layers] == ["stem", "features"]
    assert config.layers[1].shape == (8, 10, 14)
    x = np.random.default_rng(0).standard_normal((5, 3, 20, 28)).astype(np.float32)
    with torch.no_grad():
        expected = tiny_cnn.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(tiny_cnn.model.logits(x), expected, atol=1e-4)


def test_layer_gradient_through_probe_equals_autograd_on_the_module(tiny_cnn: Any) -> None:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 3, 20, 28)).astype(np.float32))
    weights = torch.zeros(3, 4)
    weights[:, 2] = 1.0
    _, activation, gradient = tiny_cnn.model.layer_gradient(x, weights, "features")
    captured: dict[str, torch.Tensor] = {}
    handle = tiny_cnn.module.features.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    try:
        logits = tiny_cnn.module(x)
        (expected,) = torch.autograd.grad(logits[:, 2].sum(), captured["a"])
    finally:
        handle.remove()
    np.testing.assert_allclose(activation.numpy(), captured["a"].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(gradient.numpy(), expected.numpy(), atol=1e-5)


def test_export_refuses_bad_arguments(tiny_cnn: Any, tmp_path: Path) -> None:
    example = torch.zeros(1, 3, 20, 28)
    common = {"mean": (0, 0, 0), "std": (1, 1, 1)}
    with pytest.raises(InvalidArgument, match="valid model name"):
        export_model(tiny_cnn.module, example, tmp_path, "../escape", labels=list("abcd"), layers=["features"], **common)
    with pytest.raises(InvalidArgument, match="no submodule"):
        export_model(tiny_cnn.module, example, tmp_path, "m", labels=list("abcd"), layers=["nope"], **common)
    with pytest.raises(InvalidArgument, match="labels"):
        export_model(tiny_cnn.module, example, tmp_path, "m", labels=list("abc"), layers=["features"], **common)
    assert not any(tmp_path.iterdir()), "a failed export must leave nothing behind"


def test_good_and_broken_models_side_by_side(repo_copy: Path) -> None:
    (_clone(repo_copy, "corrupt-onnx") / "model.onnx").write_bytes(b"not an onnx file")
    (_clone(repo_copy, "missing-torch") / "model.pt2").unlink()
    (_clone(repo_copy, "bad-config") / "config.json").write_text("{not json")
    (repo_copy / "no-config").mkdir()
    repository = ModelRepository(repo_copy)
    statuses = {s.name: s for s in repository.load_all()}
    assert statuses["tiny-cnn"].ready
    assert repository.get("tiny-cnn").config.name == "tiny-cnn"
    expected_reasons = {
        "corrupt-onnx": "cannot load ONNX model",
        "missing-torch": "model.pt2 does not exist",
        "bad-config": "not a valid model config",
        "no-config": "config.json is missing",
    }
    for name, reason in expected_reasons.items():
        assert not statuses[name].ready
        assert reason in statuses[name].reason, statuses[name].reason
        with pytest.raises(FailedPrecondition, match="not ready"):
            repository.get(name)


def test_artifacts_that_disagree_are_not_ready(repo_copy: Path, tiny_cnn: Any, tmp_path: Path) -> None:
    # Swap in an ONNX graph exported from different weights: same shapes, different logits.
    other = type(tiny_cnn.module)()
    export_model(
        other.eval(),
        torch.zeros(1, 3, 20, 28),
        tmp_path / "other",
        "tiny-cnn",
        labels=list("abcd"),
        layers=["stem", "features"],
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    shutil.copy(tmp_path / "other" / "tiny-cnn" / "model.onnx", repo_copy / "tiny-cnn" / "model.onnx")
    status = ModelRepository(repo_copy).load_all()[0]
    assert not status.ready
    assert "ONNX and torch logits differ" in status.reason


def test_pickled_weights_are_refused_before_loading(repo_copy: Path, tmp_path: Path) -> None:
    source = repo_copy / "tiny-cnn" / "model.pt2"
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    vet_pt2_archive(source)
    with pytest.raises(FailedPrecondition) as caught:
        vet_pt2_archive(tampered)
    assert caught.value.reason == "UNSAFE_MODEL_FILE"


def test_model_names_cannot_escape_the_repository(repo_copy: Path) -> None:
    repository = ModelRepository(repo_copy)
    repository.load_all()
    for name in ("../tiny-cnn", "tiny-cnn/../tiny-cnn", "/etc", "", "TINY"):
        with pytest.raises(NotFound) as caught:
            repository.get(name)
        assert caught.value.reason == "MODEL_NOT_FOUND"
