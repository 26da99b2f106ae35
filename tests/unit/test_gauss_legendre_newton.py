"""Gauss-Legendre nodes for many IG steps by Newton's method agree with numpy's eigenvalue-based leggauss."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_service.core.methods.gradient import LEGGAUSS_MAX, _gauss_legendre_newton, path_rule


@pytest.mark.parametrize("n", [2, 7, 64, LEGGAUSS_MAX + 1, 700])
def test_newton_nodes_and_weights_match_leggauss(n: int) -> None:
    nodes, weights = _gauss_legendre_newton(n)
    expected_nodes, expected_weights = np.polynomial.legendre.leggauss(n)
    np.testing.assert_allclose(nodes, expected_nodes, rtol=0, atol=1e-14)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-9, atol=1e-15)


def test_the_rule_integrates_polynomials_exactly_at_many_steps() -> None:
    alphas, weights = path_rule("gauss_legendre", 1024)
    assert np.all(np.diff(alphas) > 0) and 0 < alphas[0] and alphas[-1] < 1
    for degree in (0, 1, 5, 40):
        assert float(np.sum(weights * alphas**degree)) == pytest.approx(1 / (degree + 1), rel=1e-12)
