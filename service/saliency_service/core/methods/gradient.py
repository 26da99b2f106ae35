"""Input-gradient methods (METHODS.md §7.1): vanilla gradient (Simonyan et al. 2014), gradient x input
(Shrikumar et al. 2016) and Integrated Gradients (Sundararajan et al. 2017)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.images import gaussian_blur
from saliency_service.core.methods.base import METHODS, MethodInput
from saliency_service.core.methods.noise import GradientMethod, channel_reduced
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import ParamSpec

MAX_IG_STEPS = 1024
IG_RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gauss_legendre")
IG_BASELINES = ("zero", "blur", "uniform")
"""The baselines `ig_baseline` computes from the input; "supplied" takes the caller's (`MethodInput.baseline`)."""
SUPPLIED_BASELINE = "supplied"


def layer_map(contributions: torch.Tensor, request: MethodInput) -> torch.Tensor:
    """ML-Att (METRICS.md §5): a layer attribution summed over channels, upsampled bilinearly to the input; signed."""
    spec = request.model.config.input
    summed = contributions.sum(dim=1, keepdim=True).float()
    upsampled = F.interpolate(summed, size=(spec.height, spec.width), mode="bilinear", align_corners=False)
    return upsampled[:, 0]


def _path_tensors(alphas: np.ndarray, step_weights: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A quadrature rule's positions (float32) and weights (float64) on `device`."""
    return torch.from_numpy(alphas).float().to(device), torch.from_numpy(step_weights).to(device)


@METHODS.register("saliency")
class Saliency(GradientMethod):
    description = "Vanilla gradient (Simonyan et al.): per pixel, the largest |d logit / d input| over the colour channels."
    own_params = (
        ParamSpec(
            "abs",
            "bool",
            True,
            "True: max over channels of |gradient| (the paper's map). False: the signed gradient summed over channels.",
        ),
    )

    layer_optional = True

    def attribute_once(self, request: MethodInput) -> torch.Tensor:
        if request.layer is not None:
            # At a layer: the gradient with respect to the layer's activation, reduced the same way.
            _, _, gradient = request.layer_gradient(request.layer)
            return layer_map(channel_reduced(gradient, bool(request.params["abs"]))[:, None], request)
        _, gradient = request.model.input_gradient(request.input(), request.objective())
        return channel_reduced(gradient, bool(request.params["abs"]))


@METHODS.register("input_x_gradient")
class InputXGradient(GradientMethod):
    description = (
        "Gradient x input (Shrikumar et al. 2016): x times d objective / dx, summed over the colour channels and "
        "signed; x is the normalised input, so pixels at the dataset mean get zero."
    )

    layer_optional = True

    def attribute_once(self, request: MethodInput) -> torch.Tensor:
        if request.layer is not None:
            _, activation, gradient = request.layer_gradient(request.layer)
            return layer_map(activation * gradient, request)
        x = request.input()
        _, gradient = request.model.input_gradient(x, request.objective())
        return (x * gradient).sum(dim=1)


def path_rule(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Path positions alpha_k and step weights s_k for an IG quadrature rule (METHODS.md §7.1).

    riemann_trapezoid keeps Captum's weights (1/n, first and last halved), which sum to 1 - 1/n.
    """
    if rule not in IG_RULES:
        raise InvalidArgument(
            "INVALID_PARAMETER", f"unknown integration rule '{rule}'; use one of {', '.join(IG_RULES)}", {"parameter": "rule"}
        )
    if rule.startswith("riemann") and steps < 2:
        raise InvalidArgument(
            "TOO_FEW_STEPS",
            f"rule '{rule}' needs steps >= 2 (got {steps}); raise steps or use rule 'gauss_legendre'",
            {"parameter": "steps", "rule": rule},
        )
    k = np.arange(steps, dtype=np.float64)
    uniform = np.full(steps, 1.0 / steps)
    if rule == "riemann_left":
        return k / steps, uniform
    if rule == "riemann_right":
        return (k + 1) / steps, uniform
    if rule == "riemann_middle":
        return (k + 0.5) / steps, uniform
    if rule == "riemann_trapezoid":
        weights = uniform.copy()
        weights[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, steps), weights
    nodes, weights = np.polynomial.legendre.leggauss(steps) if steps <= LEGGAUSS_MAX else _gauss_legendre_newton(steps)
    return (nodes + 1) / 2, weights / 2


LEGGAUSS_MAX = 256
"""Above this, numpy's leggauss (an eigenvalue problem, O(n^3): 1.6 s at n = 1024, uninterruptible by a
cancel or deadline) gives way to Newton's method on the Legendre recurrence (O(n^2), milliseconds)."""


def _gauss_legendre_newton(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes on [-1, 1] (ascending) and weights: roots of P_n by Newton's method, all at once.

    P_n and P_{n-1} come from the three-term recurrence (k + 1) P_{k+1} = (2k + 1) x P_k - k P_{k-1};
    P_n'(x) = n (x P_n - P_{n-1}) / (x^2 - 1); the weight at a root is 2 / ((1 - x^2) P_n'(x)^2).
    """
    x = np.cos(np.pi * (np.arange(n, 0, -1) - 0.25) / (n + 0.5))  # ascending initial guesses, one per root
    derivative = np.ones(n)
    for _ in range(50):  # converges in about 5 (quadratically from these guesses)
        previous, current = np.ones(n), x.copy()
        for k in range(1, n):
            previous, current = current, ((2 * k + 1) * x * current - k * previous) / (k + 1)
        derivative = n * (x * current - previous) / (x * x - 1)
        step = current / derivative
        x = x - step
        if np.abs(step).max() < 1e-14:
            break
    return x, 2 / ((1 - x * x) * derivative * derivative)


def ig_baseline(kind: str, x: torch.Tensor, model: LoadedModel, seed: int) -> torch.Tensor:
    """The path's start x' (normalised space), same shape as x."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "blur":
        return gaussian_blur(x)
    spec = model.config.input
    # One noise image shared by every item, so an item's attribution does not depend on its batch position.
    noise = np.random.default_rng(seed).random((spec.channels, spec.height, spec.width))
    mean = np.asarray(spec.mean)[:, None, None]
    std = np.asarray(spec.std)[:, None, None]
    return torch.from_numpy(((noise - mean) / std).astype(np.float32)).to(x.device).expand_as(x).clone()


def _path_start(request: MethodInput, x: torch.Tensor) -> torch.Tensor:
    """The baseline the request asks for; a supplied baseline must be asked for, and only then used."""
    kind = str(request.params["baseline"])
    if kind != SUPPLIED_BASELINE:
        if request.baseline is not None:
            raise InvalidArgument(
                "BASELINE_NOT_USED",
                f"baseline images were sent but parameter 'baseline' is '{kind}'; set baseline='{SUPPLIED_BASELINE}' to use them, "
                "or send no baseline images",
                {"parameter": "baseline"},
            )
        return ig_baseline(kind, x, request.model, request.seed)
    if request.baseline is None:
        raise InvalidArgument(
            "BASELINE_MISSING",
            f"parameter baseline='{SUPPLIED_BASELINE}' needs one baseline image per input image in the request; send them, "
            f"or choose a computed baseline ({', '.join(IG_BASELINES)})",
            {"parameter": "baseline"},
        )
    # GradientMethod.maps has checked that it matches the input's shape.
    return torch.as_tensor(request.baseline, dtype=torch.float32, device=x.device)


@METHODS.register("integrated_gradients")
class IntegratedGradients(GradientMethod):
    description = (
        "Integrated Gradients: (x - x') times the gradient integrated along the straight path from a "
        "baseline x'; summed over channels, signed, so the map sums to about logit(x) - logit(x')."
    )
    own_params = (
        ParamSpec(
            "steps",
            "int",
            50,
            f"Quadrature points along the path, 1..{MAX_IG_STEPS}: capped because each step costs one backward pass "
            "per image. Riemann rules need >= 2.",
            minimum=1,
            maximum=MAX_IG_STEPS,
        ),
        ParamSpec("rule", "string", "gauss_legendre", "Quadrature rule for the path integral (Captum's names).", choices=IG_RULES),
        ParamSpec(
            "baseline",
            "string",
            "zero",
            "zero: all zeros in normalised space (the dataset mean); blur: 11x11 sigma=5 Gaussian blur of the input; "
            "uniform: uniform noise over the valid pixel range, drawn from the request's seed; "
            "supplied: the reference images sent with the request (one per image).",
            choices=(*IG_BASELINES, SUPPLIED_BASELINE),
        ),
    )
    takes_baseline = True
    layer_optional = True

    def attribute_once(self, request: MethodInput) -> torch.Tensor:
        steps = int(request.params["steps"])
        alphas, step_weights = path_rule(str(request.params["rule"]), steps)
        x = request.input()
        baseline = _path_start(request, x)
        if request.layer is not None:
            contributions = layer_integrated_gradients(request.model, x, baseline, request.objective(), request.layer, alphas, step_weights)
            return layer_map(contributions, request)
        delta = x - baseline
        objective = request.objective()
        alpha_t, weight_t = _path_tensors(alphas, step_weights, x.device)

        # Row r of the flattened B*steps path batch is item r // steps at step r % steps. Rows are
        # built one model-sized chunk at a time so memory stays bounded however large steps is.
        rows = len(x) * steps
        chunk = request.model.max_batch
        integrated = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        for start in range(0, rows, chunk):
            index = torch.arange(start, min(rows, start + chunk), device=x.device)
            item, step = index // steps, index % steps
            points = baseline[item] + alpha_t[step].view(-1, 1, 1, 1) * delta[item]
            _, gradient = request.model.input_gradient(points, objective[item])
            integrated.index_add_(0, item, gradient.double() * weight_t[step].view(-1, 1, 1, 1))
        return (delta.double() * integrated).sum(dim=1).float()


def layer_integrated_gradients(
    model: LoadedModel,
    x: torch.Tensor,
    baseline: torch.Tensor,
    objective: torch.Tensor,
    layer: str,
    alphas: np.ndarray,
    step_weights: np.ndarray,
) -> torch.Tensor:
    """IG at a layer (Captum's LayerIntegratedGradients): B x C x h x w contributions (A - A') * integral of the gradient.

    The path runs straight from A', the layer's activation for the baseline input, to A, the activation for
    x; each point is reached by adding (1 - alpha)(A' - A) at the layer through the program's probe, so the
    layers before it run on x unchanged. The contributions sum to about f(A) - f(A') (completeness).
    """
    _, acts = model.forward_tensors(torch.cat([x, baseline]), [layer])
    activation, start = acts[layer][: len(x)], acts[layer][len(x) :]
    difference = activation - start
    steps = len(alphas)
    alpha_t, weight_t = _path_tensors(alphas, step_weights, x.device)
    rows = len(x) * steps
    integrated = torch.zeros(difference.shape, dtype=torch.float64, device=x.device)
    for begin in range(0, rows, model.max_batch):
        index = torch.arange(begin, min(rows, begin + model.max_batch), device=x.device)
        item, step = index // steps, index % steps
        delta = -(1 - alpha_t[step]).view(-1, 1, 1, 1) * difference[item]
        _, _, gradients = model.layers_gradient(x[item], objective[item], [layer], {layer: delta})
        integrated.index_add_(0, item, gradients[layer].double() * weight_t[step].view(-1, 1, 1, 1))
    return difference.double() * integrated
