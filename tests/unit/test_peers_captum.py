"""Our gradient, noise and occlusion methods against Captum, the peer library, on the same torch program."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.params import resolve_params

captum_attr = pytest.importorskip("captum.attr")

CAPTUM_RULES = {
    "gauss_legendre": "gausslegendre",
    "riemann_left": "riemann_left",
    "riemann_right": "riemann_right",
    "riemann_middle": "riemann_middle",
    "riemann_trapezoid": "riemann_trapezoid",
}


def _forward_module(case: Any) -> torch.nn.Module:
    program = case.model.program

    class Forward(torch.nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            logits, _ = program.forward(inputs, program.zero_probes(len(inputs)))
            return logits

    return Forward()


def _inputs(case: Any, batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    spec = case.model.config.input
    x = np.random.default_rng(5).standard_normal((batch, 3, spec.height, spec.width)).astype(np.float32)
    return x, np.arange(batch, dtype=np.int64) % case.model.config.num_classes


@pytest.mark.parametrize("rule", list(CAPTUM_RULES))
def test_integrated_gradients_matches_captum(tiny_cnn: Any, rule: str) -> None:
    x, targets = _inputs(tiny_cnn)
    params = resolve_params(METHODS.get("integrated_gradients").params, {"steps": 16, "rule": rule}, "ig")
    ours = METHODS.get("integrated_gradients")().attribute(MethodInput(tiny_cnn.model, x, targets, params, None, 0))
    theirs = captum_attr.IntegratedGradients(_forward_module(tiny_cnn)).attribute(
        torch.from_numpy(x),
        baselines=torch.zeros_like(torch.from_numpy(x)),
        target=torch.from_numpy(targets),
        n_steps=16,
        method=CAPTUM_RULES[rule],
    )
    np.testing.assert_allclose(ours, theirs.sum(dim=1).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_vanilla_gradient_matches_captum_saliency(tiny_cnn: Any) -> None:
    x, targets = _inputs(tiny_cnn)
    params = resolve_params(METHODS.get("saliency").params, {}, "saliency")
    ours = METHODS.get("saliency")().attribute(MethodInput(tiny_cnn.model, x, targets, params, None, 0))
    theirs = captum_attr.Saliency(_forward_module(tiny_cnn)).attribute(torch.from_numpy(x), target=torch.from_numpy(targets), abs=True)
    # Simonyan et al.: the map is the maximum over channels of |gradient|.
    np.testing.assert_allclose(ours, theirs.amax(dim=1).numpy(), rtol=1e-5, atol=1e-7)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> str:
    """Printed with -s for the record: Pearson and the largest difference relative to the map's scale."""
    return f"Pearson {_pearson(ours, theirs):.6f}, max |diff| / max |map| {np.abs(ours - theirs).max() / np.abs(theirs).max():.1e}"


def _ours(case: Any, method: str, x: np.ndarray, targets: np.ndarray, seed: int = 0, **params: object) -> np.ndarray:
    cls = METHODS.get(method)
    return cls().attribute(MethodInput(case.model, x, targets, resolve_params(cls.params, params, method), None, seed))


def test_input_x_gradient_matches_captum(tiny_cnn: Any) -> None:
    x, targets = _inputs(tiny_cnn)
    ours = _ours(tiny_cnn, "input_x_gradient", x, targets)
    theirs = captum_attr.InputXGradient(_forward_module(tiny_cnn)).attribute(
        torch.from_numpy(x).requires_grad_(), target=torch.from_numpy(targets)
    )
    theirs_map = theirs.sum(dim=1).detach().numpy()
    np.testing.assert_allclose(ours, theirs_map, rtol=1e-5, atol=1e-6 * np.abs(theirs_map).max())
    print(f"input_x_gradient vs Captum InputXGradient: {_agreement(ours, theirs_map)}")


@pytest.mark.parametrize("fill", ["zero", "mean", "blur"])
@pytest.mark.parametrize(("window", "stride"), [(5, 3), (6, 6), (15, 8)])
def test_occlusion_matches_captum(tiny_cnn: Any, fill: str, window: int, stride: int) -> None:
    from saliency_service.core.methods.perturbation import occlusion_fill

    x, targets = _inputs(tiny_cnn)
    ours = _ours(tiny_cnn, "occlusion", x, targets, window=window, stride=stride, fill=fill)
    baseline = 0.0 if fill == "zero" else occlusion_fill(fill, torch.from_numpy(x))
    with torch.no_grad():
        theirs = captum_attr.Occlusion(_forward_module(tiny_cnn)).attribute(
            torch.from_numpy(x),
            sliding_window_shapes=(3, window, window),
            strides=(3, stride, stride),
            baselines=baseline,
            target=torch.from_numpy(targets),
        )
    # The window spans all channels, so Captum gives every channel the same value: our map.
    np.testing.assert_allclose(theirs[:, 1:].numpy(), theirs[:, :1].expand(-1, 2, -1, -1).numpy(), rtol=1e-6)
    theirs_map = theirs[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs_map, rtol=1e-4, atol=1e-4 * np.abs(theirs_map).max())
    print(f"occlusion {fill} {window}/{stride} vs Captum Occlusion: {_agreement(ours, theirs_map)}")


def _channel_summed(method: type) -> type:
    """A Captum attribution whose map is summed over channels, so NoiseTunnel aggregates the same 2-D maps we do."""

    def attribute(self: Any, inputs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        attributions: torch.Tensor = method.attribute.__wrapped__(self, inputs, **kwargs)  # type: ignore[attr-defined]
        return attributions.sum(dim=1, keepdim=True)

    attribute.__wrapped__ = attribute  # type: ignore[attr-defined]  # NoiseTunnel calls attribute.__wrapped__
    return type(f"ChannelSummed{method.__name__}", (method,), {"attribute": attribute})


CAPTUM_BASES = {
    "input_x_gradient": (lambda: captum_attr.InputXGradient, {}, {}),
    "saliency": (lambda: captum_attr.Saliency, {"abs": False}, {"abs": False}),
    "integrated_gradients": (lambda: captum_attr.IntegratedGradients, {"steps": 8}, {"n_steps": 8, "method": "gausslegendre"}),
}


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("method", list(CAPTUM_BASES))
def test_noise_tunnel_matches_captum_on_identical_noise(tiny_cnn: Any, monkeypatch: pytest.MonkeyPatch, kind: str, method: str) -> None:
    """Captum's NoiseTunnel draws from torch's global RNG, so its noise is replaced by ours (same draws, same scale)."""
    from captum.attr._core.noise_tunnel import NoiseTunnel

    from saliency_service.core.methods.noise import noise_draws

    x, targets = _inputs(tiny_cnn)
    samples, sigma, seed = 6, 0.15, 3
    ours = _ours(tiny_cnn, method, x, targets, seed=seed, noise=kind, noise_samples=samples, noise_sigma=sigma, **CAPTUM_BASES[method][1])
    spread = x.reshape(len(x), -1).max(axis=1) - x.reshape(len(x), -1).min(axis=1)
    draws = noise_draws(seed, samples, x.shape[1:])
    # Captum repeats each item nt_samples times in a row (repeat_interleave): row b * samples + s.
    injected = torch.from_numpy((sigma * spread[:, None, None, None, None] * draws[None]).reshape(-1, *x.shape[1:]))

    def add_our_noise(inputs: torch.Tensor, stdev: float, nt_samples_partition: int) -> torch.Tensor:
        assert nt_samples_partition == samples
        return inputs.repeat_interleave(nt_samples_partition, dim=0) + injected

    monkeypatch.setattr(NoiseTunnel, "_add_noise_to_input", staticmethod(add_our_noise))
    base = _channel_summed(CAPTUM_BASES[method][0]())(_forward_module(tiny_cnn))
    theirs = NoiseTunnel(base).attribute(
        torch.from_numpy(x), nt_type=kind, nt_samples=samples, stdevs=1.0, target=torch.from_numpy(targets), **CAPTUM_BASES[method][2]
    )
    theirs_map = theirs[:, 0].detach().numpy()
    np.testing.assert_allclose(ours, theirs_map, rtol=1e-4, atol=1e-4 * np.abs(theirs_map).max())
    print(f"{method} {kind} vs Captum NoiseTunnel (identical noise): {_agreement(ours, theirs_map)}")


def test_smoothgrad_matches_captum_in_expectation(tiny_cnn: Any) -> None:
    """With each library's own noise (same sigma), the SmoothGrad means agree once enough samples are drawn."""
    x, targets = _inputs(tiny_cnn, batch=2)
    samples, sigma = 256, 0.15
    ours = _ours(tiny_cnn, "input_x_gradient", x, targets, seed=1, noise="smoothgrad", noise_samples=samples, noise_sigma=sigma)
    torch.manual_seed(0)
    tunnel = captum_attr.NoiseTunnel(captum_attr.InputXGradient(_forward_module(tiny_cnn)))
    for item in range(len(x)):
        stdev = sigma * float(x[item].max() - x[item].min())
        theirs = tunnel.attribute(
            torch.from_numpy(x[item : item + 1]), nt_type="smoothgrad", nt_samples=samples, stdevs=stdev, target=int(targets[item])
        )
        pearson = _pearson(ours[item], theirs.sum(dim=1).detach().numpy())
        print(f"input_x_gradient smoothgrad vs Captum NoiseTunnel (own noise, {samples} samples), item {item}: Pearson {pearson:.4f}")
        assert pearson >= 0.99
