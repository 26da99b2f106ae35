"""Our gradient methods against Captum, the peer library, on the same torch program."""

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
