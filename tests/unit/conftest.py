"""Tiny models built in fixtures (no downloads): exported once per session and loaded like the server does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from saliency_service.core.models.export import export_model
from saliency_service.core.models.model import LoadedModel, RuntimeOptions
from saliency_service.shapes.vit import ShapesViT, VitConfig, declared_layers

# The test machine is shared: one thread keeps the suite from starving its neighbours.
torch.set_num_threads(1)

CNN_SIZE = (20, 28)
LINEAR_SIZE = (9, 12)
REGION_SIZE = (16, 16)
# Non-square, with a register token: a swapped h/w or a wrong prefix count cannot pass unnoticed.
VIT_CONFIG = VitConfig(height=16, width=24, patch=4, dim=16, depth=3, heads=2, mlp_ratio=2, classes=4, registers=1, stem="patch")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelCase:
    """A kept, non-exported torch module and the model exported from it."""

    module: nn.Module
    model: LoadedModel


class TinyCnn(nn.Module):
    """Conv-BN-Softplus twice, then a strided conv and a dense head, so gradients at `features` vary with position.

    Softplus, not ReLU: activations stay non-negative (as Eigen-CAM's sign rule assumes) while the
    logit is smooth along an IG path, so 64 Gauss-Legendre steps meet the 1% completeness bound; a
    ReLU net's piecewise-constant gradient needs hundreds of steps for that.
    """

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Softplus())
        self.features = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Softplus())
        self.mix = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Softplus())
        self.head = nn.Linear(8 * 5 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.features(self.stem(x))).flatten(1))


class LinearNet(nn.Module):
    """y = W . flatten(x) + b; `features` is an identity 1x1 conv so there is a layer to declare."""

    def __init__(self, height: int, width: int, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1, bias=False)
        self.head = nn.Linear(3 * height * width, classes)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3)[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class RegionPresence(nn.Module):
    """METRICS.md §1's synthetic model: logits [log p, log(1-p)], p = share of region M's pixels still original.

    A pixel counts as original when all its channels equal the stored image exactly. The epsilon keeps
    the logits finite so ONNX and torch agree; it moves p by at most 1e-6.
    """

    def __init__(self, original: torch.Tensor, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("original", original)
        self.register_buffer("region", region.float()[None])
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        same = (self.features(x) == self.original).float().amin(dim=1)
        p = (same * self.region).sum(dim=(1, 2)) / self.region.sum()
        return torch.stack([torch.log(p + 1e-6), torch.log(1 - p + 1e-6)], dim=1)


def _randomise_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics, so eval-mode BatchNorm is not the identity."""
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            size = layer.num_features
            layer.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
            layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))
            layer.weight.data.copy_(1 + 0.3 * torch.randn(size, generator=generator))
            layer.bias.data.copy_(0.2 * torch.randn(size, generator=generator))


def _export(
    module: nn.Module, size: tuple[int, int], repository: Path, name: str, labels: list[str], layers: list[str], **options: int
) -> ModelCase:
    module.eval()
    example = torch.zeros((1, 3, *size))
    folder = export_model(module, example, repository, name, labels=labels, layers=layers, mean=MEAN, std=STD, **options)
    return ModelCase(module, LoadedModel.load(folder, RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False)))


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_cnn(repository: Path) -> ModelCase:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = TinyCnn()
    with torch.no_grad():
        _randomise_batchnorm(module, generator)
        # He init and a stronger head than PyTorch's defaults, so logits move by O(1) with the input.
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
        module.head.weight.mul_(4.0)
    return _export(module, CNN_SIZE, repository, "tiny-cnn", ["circle", "square", "star", "cross"], ["stem", "features"])


@pytest.fixture(scope="session")
def tiny_vit(repository: Path) -> ModelCase:
    """A randomly initialised ViT (class token + 1 register, 4x6 patch grid, 3 blocks); its layers are token layers.

    The patch size is given at export (the grid is inferred from it); the default layer is the last
    block's norm1, whose tokens reach the class-token head.
    """
    torch.manual_seed(3)
    module = ShapesViT(VIT_CONFIG)
    with torch.no_grad():
        # Stronger than the training init, so logits move by O(1) with the input.
        module.head.weight.normal_(0.0, 1.0)
        module.cls_token.normal_(0.0, 1.0)
    size = (VIT_CONFIG.height, VIT_CONFIG.width)
    return _export(
        module, size, repository, "tiny-vit", ["circle", "square", "star", "cross"], list(declared_layers(VIT_CONFIG.depth)), patch_size=4
    )


@pytest.fixture(scope="session")
def linear_net(repository: Path) -> ModelCase:
    torch.manual_seed(1)
    return _export(LinearNet(*LINEAR_SIZE), LINEAR_SIZE, repository, "linear", ["a", "b", "c"], ["features"])


@pytest.fixture(scope="session")
def region_original() -> np.ndarray:
    """The image the region model remembers: no exact zeros, so both substrates change every pixel."""
    return (3.0 + np.random.default_rng(7).standard_normal((1, 3, *REGION_SIZE))).astype(np.float32)


@pytest.fixture(scope="session")
def region_mask() -> np.ndarray:
    """Region M: an 8x8 block, f = 64/256 = 0.25."""
    mask = np.zeros(REGION_SIZE, dtype=bool)
    mask[4:12, 2:10] = True
    return mask


@pytest.fixture(scope="session")
def region_model(repository: Path, region_original: np.ndarray, region_mask: np.ndarray) -> ModelCase:
    module = RegionPresence(torch.from_numpy(region_original), torch.from_numpy(region_mask))
    return _export(module, REGION_SIZE, repository, "region", ["present", "absent"], ["features"])
