"""Write the trained `shapes` weights into a model repository (the shipped one by default).

python -m saliency_service.shapes.export --weights build/shapes_state.pt [--repository DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.models.export import export_model
from saliency_service.shapes.generator import IMAGE_SIZE, LABELS
from saliency_service.shapes.network import MEAN, SERVING_BATCHING, SHAPE_GROUPS, STD, ShapesNet

LAYERS = ("layer1", "layer2", "layer3")
DESCRIPTION = "Residual CNN trained by saliency-service on its procedural shapes dataset (128x128 RGB)."


def export_shapes(weights: Path, repository: Path = EMBEDDED_REPOSITORY, version: str = "1") -> Path:
    """Load a state dict (weights only) into ShapesNet and export it as the `shapes` entry."""
    module = ShapesNet(len(LABELS))
    module.load_state_dict(torch.load(weights, weights_only=True))
    return export_model(
        module.eval(),
        torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),
        repository,
        "shapes",
        labels=LABELS,
        layers=LAYERS,
        mean=MEAN,
        std=STD,
        version=version,
        description=DESCRIPTION,
        overwrite=True,        dynamic_batching=SERVING_BATCHING,
        groups=SHAPE_GROUPS,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--repository", type=Path, default=EMBEDDED_REPOSITORY)
    parser.add_argument("--version", default="1")
    args = parser.parse_args()
    print(f"exported to {export_shapes(args.weights, args.repository, args.version)}")


if __name__ == "__main__":
    main()
