"""The random baseline: a seeded noise map that ignores the model, the floor of every evaluation table."""

from __future__ import annotations

import hashlib

import numpy as np

from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.params import ParamSpec

DISTRIBUTIONS = ("uniform", "gaussian")


def noise_seed(seed: int, image: np.ndarray) -> list[int]:
    """The request's seed and a digest of the image: the same request gives the same maps, different images
    different ones, and an image's map does not depend on its place in the batch (so batch == per item)."""
    digest = hashlib.blake2b(np.ascontiguousarray(image, dtype=np.float32).tobytes(), digest_size=8).digest()
    return [seed % 2**64, int.from_bytes(digest, "little")]


@METHODS.register("random")
class RandomMap(SaliencyMethod):
    description = (
        "A random baseline: i.i.d. noise per pixel (uniform on [0, 1) or standard normal), seeded by the request's seed "
        "and the image; it ignores the model and the target, so any metric's value for it is chance level."
    )
    family = "baseline"
    contrastive = False
    params = (
        ParamSpec("distribution", "string", "uniform", "Noise per pixel: uniform on [0, 1) or standard normal.", choices=DISTRIBUTIONS),
    )

    def maps(self, request: MethodInput) -> np.ndarray:
        height, width = request.x.shape[2:]
        gaussian = request.params["distribution"] == "gaussian"
        maps = np.empty((len(request.x), height, width), dtype=np.float32)
        for index, image in enumerate(request.x):
            rng = np.random.default_rng(noise_seed(request.seed, image))
            maps[index] = rng.standard_normal((height, width)) if gaussian else rng.random((height, width))
        return maps
