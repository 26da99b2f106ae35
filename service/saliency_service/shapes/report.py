"""`saliency-service shapes-eval`: the shipped `shapes` model's held-out accuracy and how often
Grad-CAM's peak lies on the object's mask, measured through the same engine the server runs."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from saliency_service.core.engine import Engine, ExplainJob
from saliency_service.core.images import ImageLimits
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.types import RawTensor
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate_batch

BATCH = 50


@dataclass(frozen=True)
class ShapesReport:
    n: int
    accuracy: float
    grad_cam_pointing: float
    seconds: float


def run_report(repository: Path, n: int = 1000, seed_offset: int = 0, out: TextIO = sys.stdout) -> ShapesReport:
    models = ModelRepository(repository)
    models.load_all()
    engine = Engine(models, ImageLimits(max_images=BATCH))
    correct = hits = done = 0
    start = time.perf_counter()
    for first in range(0, n, BATCH):
        seeds = list(range(HELDOUT_SEED_OFFSET + seed_offset + first, HELDOUT_SEED_OFFSET + seed_offset + min(first + BATCH, n)))
        images, labels, masks = generate_batch(seeds)
        raw = [RawTensor("uint8", image.shape, image.tobytes()) for image in images]
        # Grad-CAM explains the predicted class; the prediction comes back with it.
        explanations = engine.explain(ExplainJob(model="shapes", images=raw, method="grad_cam"))
        for explanation, label, mask in zip(explanations, labels, masks, strict=True):
            correct += int(explanation.predicted == int(label))
            hits += int(mask.flat[int(np.argmax(explanation.saliency))])
        done += len(seeds)
        print(f"\r{done}/{n} images: accuracy {correct / done:.4f}, Grad-CAM peak on mask {hits / done:.4f}", end="", file=out, flush=True)
    print(file=out)
    report = ShapesReport(n=done, accuracy=correct / done, grad_cam_pointing=hits / done, seconds=time.perf_counter() - start)
    print(f"held-out accuracy: {report.accuracy:.4f} (n={report.n})", file=out)
    print(f"Grad-CAM peak on the shape's mask: {report.grad_cam_pointing:.4f} (n={report.n})", file=out)
    print(f"took {report.seconds:.1f} s", file=out)
    return report
