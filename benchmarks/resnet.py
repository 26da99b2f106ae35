"""ResNet-18 and ResNet-50 (He et al., CVPR 2016) for benchmarks, without torchvision.

Module names and state-dict keys are torchvision's (`conv1`, `bn1`, `layer1.0.downsample.0`, `fc`, ...), so a
peer that expects torchvision's blocks sees the same structure, and the same seeded weights load into either.
ReLUs are not in-place (Captum's GuidedBackprop and Zennit hook them). Weights are random (Kaiming-normal
convolutions, perturbed BatchNorm statistics): speed does not depend on them.
"""

from __future__ import annotations

import torch
from torch import nn

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
CLASSES = 1000


def _conv_bn(inputs: int, outputs: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(inputs, outputs, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(outputs)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inputs: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(inputs, width, 3, stride)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inputs: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(inputs, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, width * self.expansion, 1)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int], classes: int = CLASSES) -> None:
        super().__init__()
        self.inputs = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, depths[0], 1)
        self.layer2 = self._stage(block, 128, depths[1], 2)
        self.layer3 = self._stage(block, 256, depths[2], 2)
        self.layer4 = self._stage(block, 512, depths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, classes)

    def _stage(self, block: type[BasicBlock | Bottleneck], width: int, depth: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inputs != width * block.expansion:
            downsample = nn.Sequential(*_conv_bn(self.inputs, width * block.expansion, 1, stride))
        blocks: list[nn.Module] = [block(self.inputs, width, stride, downsample)]
        self.inputs = width * block.expansion
        blocks.extend(block(self.inputs, width) for _ in range(depth - 1))
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHITECTURES = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def build(name: str, seed: int = 0) -> ResNet:
    """`resnet18` or `resnet50` in eval mode with seeded random weights (the same for the same seed)."""
    block, depths = ARCHITECTURES[name]
    net = ResNet(block, depths)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            elif isinstance(layer, nn.BatchNorm2d):
                size = layer.num_features
                layer.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))
                # Small residual-branch scales keep activations bounded through 16 blocks with random weights.
                layer.weight.copy_(0.3 + 0.1 * torch.rand(size, generator=generator))
                layer.bias.copy_(0.05 * torch.randn(size, generator=generator))
            elif isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.5, generator=generator)
                nn.init.zeros_(layer.bias)
    return net.eval()
