"""ShapesNet: a small ResNet-style CNN for the procedural shapes dataset.

Built from export-friendly ops only (mean, subtract, Conv2d, BatchNorm2d,
ReLU, add, AdaptiveAvgPool2d, flatten, Linear) so that ``torch.export`` and the dynamo
ONNX exporter handle it without special cases. The last stage, ``layer3``,
runs at 1/8 of the input resolution (16x16 for 128x128 inputs) so that
Grad-CAM on it yields usefully sharp maps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from saliency_service.core.models.config import DynamicBatching

# How the shipped models are served: concurrent Explain requests merge into batches of up to 16 images,
# a request waiting at most 2 ms for company.
SERVING_BATCHING = DynamicBatching(max_batch_size=16, max_queue_delay_microseconds=2000)

# Coarse classes over the shapes (RFxG's group granularity): outlines without corners, polygons, and
# shapes with re-entrant points.
SHAPE_GROUPS: dict[str, tuple[str, ...]] = {"rounded": ("circle", "heart"), "polygon": ("square", "triangle"), "pointed": ("star", "cross")}

# Per-channel statistics of generated training images scaled to [0, 1]
# (measured on 20k single- and two-shape training images, rounded).
MEAN: tuple[float, float, float] = (0.500, 0.500, 0.498)
STD: tuple[float, float, float] = (0.246, 0.245, 0.244)

# Channel widths of the stem and the three stages.
_WIDTHS: tuple[int, int, int, int] = (16, 32, 48, 64)
_L3_BLOCKS = 2


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) skip."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward pass."""
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add: hooks and exporters see the block output unaltered.
        return torch.relu(out + identity)


class ShapesNet(nn.Module):
    """Stem (1/2) -> layer1 (1/4) -> layer2 (1/8) -> layer3 (1/8) -> pool -> fc."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        w0, w1, w2, w3 = _WIDTHS
        # Every stage before layer3 halves the resolution (128 -> 64 -> 32
        # -> 16); layer3 stays at 16x16 so its Grad-CAM maps localise well.
        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w0),
            nn.ReLU(inplace=False),
        )
        self.layer1 = nn.Sequential(BasicBlock(w0, w1, stride=2))
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, stride=2))
        self.layer3 = nn.Sequential(*[BasicBlock(w2 if i == 0 else w3, w3) for i in range(_L3_BLOCKS)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> ``layer3`` feature maps (N x C x H/8 x W/8)."""
        # Remove each image's mean colour. Backgrounds and shapes both have
        # random colours; without this the global colour dominates the
        # pooled features at initialisation and training stalls at chance.
        x = x - x.mean(dim=(2, 3), keepdim=True)
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        features: torch.Tensor = self.layer3(x)
        return features

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        """``layer3`` feature maps -> logits."""
        logits: torch.Tensor = self.fc(torch.flatten(self.pool(feats), 1))
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map N x 3 x H x W normalised images to N x num_classes logits."""
        return self.classify(self.features(x))


def preprocess(images_uint8: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 RGB -> N x 3 x H x W float32, normalised by MEAN/STD."""
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 images, got shape {images_uint8.shape}")
    if images_uint8.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images_uint8.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((x - mean) / std).contiguous()
