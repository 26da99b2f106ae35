"""`saliency-service export` writes a servable entry from a module factory and a weights file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saliency_service.cli import main
from saliency_service.core.models.repository import ModelRepository

FACTORY = """
import torch
from torch import nn


def build() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
"""


def test_export_command_round_trip(tmp_path: Path) -> None:
    (tmp_path / "cli_factory_module.py").write_text(FACTORY)
    sys.path.insert(0, str(tmp_path))
    try:
        import cli_factory_module  # type: ignore[import-not-found]

        torch.manual_seed(3)
        module: nn.Module = cli_factory_module.build()
        torch.save(module.state_dict(), tmp_path / "weights.pt")
        code = main(
            [
                "export", "--module", "cli_factory_module:build", "--weights", str(tmp_path / "weights.pt"),
                "--name", "toy", "--repository", str(tmp_path / "repo"), "--input-size", "3,12,10",
                "--labels", "yes,no", "--layers", "0", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2",
            ]
        )  # fmt: skip
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cli_factory_module", None)
    assert code == 0
    repository = ModelRepository(tmp_path / "repo")
    (status,) = repository.load_all()
    assert status.ready and status.config is not None
    assert status.config.labels == ("yes", "no")
    assert status.config.layer("0").shape == (4, 12, 10)
    assert status.config.input.mean == (0.5, 0.5, 0.5)
    x = np.random.default_rng(0).standard_normal((3, 3, 12, 10)).astype(np.float32)
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(repository.get("toy").logits(x), expected, atol=1e-5)
