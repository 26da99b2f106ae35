"""Held-out accuracy of a shapes classifier.

``heldout_accuracy`` is backend-agnostic: it only needs a function from a
batch of uint8 images to class indices, so the same check can be run on the
PyTorch weights, an exported program or an ONNX artifact.

Usage::

    PYTHONPATH=service python -m saliency_service.shapes.evaluate \\
        --weights build/shapes_state.pt --n 1000
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from saliency_service.shapes.generator import LABELS, generate_batch, heldout_seeds
from saliency_service.shapes.network import ShapesNet, preprocess

Predictor = Callable[[np.ndarray], np.ndarray]


def heldout_accuracy(predict: Predictor, n: int = 1000, batch_size: int = 100) -> float:
    """Fraction of ``n`` held-out single-shape images that ``predict`` labels correctly.

    ``predict`` maps N x 128 x 128 x 3 uint8 images to N class indices.
    """
    if n <= 0 or batch_size <= 0:
        raise ValueError("n and batch_size must be positive")
    correct = 0
    for start in range(0, n, batch_size):
        seeds = heldout_seeds(min(batch_size, n - start), start=start)
        images, labels, _ = generate_batch(seeds)
        pred = np.asarray(predict(images)).reshape(-1)
        if pred.shape != labels.shape:
            raise ValueError(f"predict returned shape {pred.shape}, expected {labels.shape}")
        correct += int(np.count_nonzero(pred == labels))
    return correct / n


def torch_predictor(model: torch.nn.Module) -> Predictor:
    """Wrap an eval-mode PyTorch classifier as a uint8-images -> indices function."""

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            predicted: np.ndarray = model(preprocess(images)).argmax(dim=1).numpy()
            return predicted

    return predict


def load_state_dict_model(weights: Path) -> ShapesNet:
    """Build a ShapesNet and load a state dict saved by ``train.py``."""
    model = ShapesNet(num_classes=len(LABELS))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print held-out accuracy of saved weights."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="state dict (.pt)")
    parser.add_argument("--n", type=int, default=1000, help="number of held-out images")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    predict = torch_predictor(load_state_dict_model(args.weights))
    acc = heldout_accuracy(predict, n=args.n, batch_size=args.batch_size)
    print(f"held-out accuracy: {acc:.4f} ({args.n} images, weights {args.weights})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
