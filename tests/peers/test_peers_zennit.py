"""Peer check: our graph-level LRP composites against Zennit 0.5.1 on a small ResNet-style CNN (METHODS.md §6).

Zennit works on the nn.Module with hooks and its canonizers (BatchNorm merging and the torchvision
BasicBlock rewrite); we work on the exported program with no user code. Both seed the target logit's
gradient with the logit itself. Run in the peer environment:

    PYTHONPATH=service:clients/python /work/peerenv/bin/python -m pytest -q tests/peers/test_peers_zennit.py -s
"""

from __future__ import annotations

from pathlib import Path

import pytest

zennit = pytest.importorskip("zennit")
torchvision_resnet = pytest.importorskip("torchvision.models.resnet")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402

from saliency_service.core.methods.lrp import COMPOSITES, composite_rules, input_relevance  # noqa: E402
from saliency_service.core.models.export import export_model  # noqa: E402
from saliency_service.core.models.model import LoadedModel, RuntimeOptions  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = (32, 32)
CLASSES = 5


class SmallResNet(nn.Module):
    """conv-BN-ReLU-maxpool stem, two torchvision BasicBlocks (the second strided, with a conv-BN shortcut), GAP, dense."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = torchvision_resnet.BasicBlock(8, 8)
        shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer2 = torchvision_resnet.BasicBlock(8, 16, stride=2, downsample=shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, LoadedModel]:
    generator = torch.Generator().manual_seed(0)
    net = SmallResNet()
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
            if isinstance(layer, nn.BatchNorm2d):
                size = layer.num_features
                layer.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))
                layer.weight.copy_(1 + 0.3 * torch.randn(size, generator=generator))
                layer.bias.copy_(0.2 * torch.randn(size, generator=generator))
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(0.5 * torch.randn(layer.weight.shape, generator=generator))
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))
    net.eval()
    folder = export_model(
        net,
        torch.zeros((1, 3, *SIZE)),
        Path(tmp_path_factory.mktemp("peer_models")),
        "small-resnet",
        labels=[f"c{i}" for i in range(CLASSES)],
        layers=["layer1"],
        mean=MEAN,
        std=STD,
    )
    return net, LoadedModel.load(folder, RuntimeOptions(max_batch=16, threads=1, prefer_cuda=False))


def _zennit_composite(name: str, x: torch.Tensor) -> object:
    canonizers = [ResNetCanonizer()]
    if name == "epsilon_plus":
        return EpsilonPlus(canonizers=canonizers)
    if name == "epsilon_plus_flat":
        return EpsilonPlusFlat(canonizers=canonizers)
    if name == "epsilon_alpha2_beta1":
        return EpsilonAlpha2Beta1(canonizers=canonizers)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return EpsilonGammaBox(low=((0 - mean) / std).expand_as(x), high=((1 - mean) / std).expand_as(x), canonizers=canonizers)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().ravel().numpy(), b.double().ravel().numpy())[0, 1])


@pytest.mark.parametrize("composite", COMPOSITES)
def test_composite_matches_zennit(composite: str, shared: tuple[nn.Module, LoadedModel]) -> None:
    net, model = shared
    # Pixels in 0..1, normalised as the model expects.
    pixels = torch.rand((4, 3, *SIZE), generator=torch.Generator().manual_seed(1))
    x = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    targets = torch.tensor([0, 1, 2, 3])
    onehot = torch.eye(CLASSES)[targets]

    ours = input_relevance(model, x, onehot, composite_rules(composite, model), times_logits=True)
    with Gradient(model=net, composite=_zennit_composite(composite, x)) as attributor:
        _, theirs = attributor(x.clone(), lambda output: output * onehot)
    theirs = theirs.detach()

    pearson = _pearson(ours, theirs)
    map_pearson = _pearson(ours.sum(1), theirs.sum(1))
    scale = float(theirs.abs().max())
    max_error = float((ours - theirs).abs().max()) / scale
    print(f"\n{composite}: pearson {pearson:.6f} (maps {map_pearson:.6f}), max |difference| / max |R| = {max_error:.2e}")
    assert pearson >= 0.99
    assert map_pearson >= 0.99
    assert max_error < 1e-3
