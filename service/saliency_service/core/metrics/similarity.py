"""How alike two maps are: Pearson, Spearman and SSIM, with one rule for constant maps.

A correlation with a constant map is undefined. The metrics here compare a map with a map of the
same method under a change (another class, model or input), so they use: two constant maps that are
equal are identical (1.0); a constant map against a varying one shares no order (0.0).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter
from scipy.stats import rankdata


def _constant(a: np.ndarray) -> bool:
    return bool(np.ptp(a) == 0)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps over their pixels (constant maps: see the module docstring)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if _constant(a) or _constant(b):
        return 1.0 if _constant(a) and _constant(b) and a[0] == b[0] else 0.0
    a, b = a - a.mean(), b - b.mean()
    return float(np.clip(a @ b / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if _constant(a) or _constant(b):
        return pearson(a, b)
    return pearson(rankdata(a), rankdata(b))


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Structural similarity of two H x W maps (Wang et al. 2004), as scikit-image computes it by default.

    A `window` x `window` uniform window (smaller, odd, when the map is), sample covariances,
    K1 = 0.01, K2 = 0.03, data range = max - min over both maps, and the mean over the windows that
    fit inside the map.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    data_range = float(max(a.max(), b.max()) - min(a.min(), b.min()))
    if data_range == 0:
        return 1.0
    window = min(window, *a.shape)
    window -= 1 - window % 2
    count = window * window
    correction = count / (count - 1) if count > 1 else 1.0

    def mean(v: np.ndarray) -> np.ndarray:
        return np.asarray(uniform_filter(v, size=window, mode="reflect"))

    mu_a, mu_b = mean(a), mean(b)
    var_a = correction * (mean(a * a) - mu_a * mu_a)
    var_b = correction * (mean(b * b) - mu_b * mu_b)
    cov = correction * (mean(a * b) - mu_a * mu_b)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = (window - 1) // 2
    inner = index[pad : index.shape[0] - pad, pad : index.shape[1] - pad]
    return float(inner.mean())
