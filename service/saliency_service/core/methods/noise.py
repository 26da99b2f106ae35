"""SmoothGrad, SmoothGrad² and VarGrad as a parameter of every gradient method (METHODS.md §7.2).

A method built on `GradientMethod` implements `attribute_once`; `maps` draws `noise_samples`
noisy copies of each image (Gaussian, sigma = `noise_sigma` x the image's value range, as in
Smilkov et al. 2017), runs the method once on all of them as one batch, and aggregates the maps:
mean (SmoothGrad), mean of squares (SmoothGrad²) or variance (VarGrad, Adebayo et al. 2018).
With `noise` = "none" the method runs once on the clean images.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from typing import ClassVar

import numpy as np
import torch

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods.base import Maps, MethodInput, SaliencyMethod
from saliency_service.core.params import ParamSpec

NOISE_KINDS = ("none", "smoothgrad", "smoothgrad_sq", "vargrad")
MAX_NOISE_SAMPLES = 256

NOISE_PARAMS = (
    ParamSpec(
        "noise",
        "string",
        "none",
        "Average the map over noisy copies of the input: smoothgrad (mean), smoothgrad_sq (mean of squares), "
        "vargrad (variance); none runs once on the clean input.",
        choices=NOISE_KINDS,
    ),
    ParamSpec(
        "noise_samples",
        "int",
        10,
        f"Noisy copies per image when noise is not none, 1..{MAX_NOISE_SAMPLES}; each costs one run of the method.",
        minimum=1,
        maximum=MAX_NOISE_SAMPLES,
    ),
    ParamSpec(
        "noise_sigma",
        "float",
        0.15,
        "Noise standard deviation as a fraction of each image's value range (max - min); the paper uses 0.1..0.2.",
        minimum=0.0,
        maximum=1.0,
    ),
)


NOISE_STREAM = 1
"""SeedSequence spawn key of the noise draws: a stream of their own, so the noise is independent of any other
draws a method makes from the same request seed (Integrated Gradients' uniform baseline uses default_rng(seed))."""


def noise_draws(seed: int, samples: int, shape: tuple[int, ...]) -> np.ndarray:
    """samples x shape standard normal float32 draws, the same for every item of a request."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(NOISE_STREAM,)))
    return rng.standard_normal((samples, *shape), dtype=np.float32)


def channel_reduced(gradient: torch.Tensor, absolute: bool) -> torch.Tensor:
    """B x C x H x W -> B x H x W: the largest |value| over the colour channels, or the signed sum."""
    return gradient.abs().amax(dim=1) if absolute else gradient.sum(dim=1)


class GradientMethod(SaliencyMethod):
    """A method whose map is a function of one input; gains the noise parameters for free."""

    family = "gradient"
    own_params: ClassVar[tuple[ParamSpec, ...]] = ()
    """The method's own parameters; `params` is these plus NOISE_PARAMS."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = (*cls.own_params, *NOISE_PARAMS)

    def maps(self, request: MethodInput) -> Maps:
        # Checked before the noisy batch indexes the baselines by item.
        if request.baseline is not None and np.shape(request.baseline) != tuple(request.x.shape):
            raise InvalidArgument(
                "BASELINE_SHAPE_MISMATCH",
                f"the supplied baselines have shape {list(np.shape(request.baseline))} after preprocessing but the inputs have "
                f"{list(request.x.shape)}; send exactly one baseline image per input image",
                {"parameter": "baseline"},
            )
        kind = str(request.params.get("noise", "none"))
        if kind == "none":
            return self.attribute_once(request)
        samples = int(request.params["noise_samples"])
        sigma = float(request.params["noise_sigma"])
        # The noisy copies are made on the model's device and every map stays there until the mean or variance.
        x = request.input()
        batch = len(x)
        flat = x.reshape(batch, -1)
        spread = flat.amax(dim=1) - flat.amin(dim=1)
        # Row r of the noisy batch is item r // samples; each item's noise depends only on the seed and
        # its own sample index, so an item's map does not depend on its batch position.
        noise = torch.from_numpy(noise_draws(request.seed, samples, tuple(x.shape[1:]))).to(x.device)
        noisy = x[:, None] + sigma * spread[:, None, None, None, None] * noise[None]
        items = np.repeat(np.arange(batch), samples)
        expanded = dataclasses.replace(
            request,
            x=noisy.reshape(batch * samples, *x.shape[1:]),
            targets=request.targets[items],
            foils=None if request.foils is None else request.foils[items],
            baseline=None if request.baseline is None else np.asarray(request.baseline)[items],
            activations={},  # the engine's activations are of the clean images
        )
        maps = torch.as_tensor(self.attribute_once(expanded), device=x.device).double()
        maps = maps.reshape(batch, samples, *self._map_shape(request))
        if kind == "smoothgrad":
            result = maps.mean(dim=1)
        elif kind == "smoothgrad_sq":
            result = (maps**2).mean(dim=1)
        else:
            result = maps.var(dim=1, correction=0)
        return result.float()

    @staticmethod
    def _map_shape(request: MethodInput) -> tuple[int, int]:
        spec = request.model.config.input
        return spec.height, spec.width

    @abstractmethod
    def attribute_once(self, request: MethodInput) -> Maps:
        """B x H x W maps for `request.x` exactly as given (no noise), on the model's device where the method runs in torch."""
