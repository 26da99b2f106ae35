"""The searches of Saliency Map Verbalization over token attributions (Feldhus et al. 2023; METRICS.md §10).

Every function takes `evidence`: the attributions of one sign as they count for that sign (the
attributions themselves for positive evidence, their negation for negative evidence), float64.
Written from the spec, with its fixes to the reference code: windows start at 0..n-L (the reference
stops one short), coverage of a span is over its inclusive range, and the `mean` threshold takes at
least one value (the reference divides 0 by 0 when floor(v*n) = 0).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

THRESHOLDS = ("mean", "quantile", "variance")


@dataclass(frozen=True)
class Snippet:
    """Token positions found together, with the search score that found them and their coverage."""

    indices: tuple[int, ...]
    score: float
    """Mean normalised attribution under the filter's ones (the window score v)."""
    coverage: float
    """Share of the sign's total attribution the snippet holds (SMV's coverage), 0..1."""


def normalised(evidence: np.ndarray) -> np.ndarray:
    """a / |max a| (the caller ensures max a > 0)."""
    return evidence / abs(float(evidence.max()))


def threshold(scaled: np.ndarray, kind: str, top_fraction: float, k: float) -> float:
    """θ: the mean of the top floor(v*n) normalised values (at least one); k*std ('quantile', SMV's name); k*var."""
    if kind == "mean":
        count = max(1, int(np.floor(top_fraction * len(scaled))))
        return float(np.sort(scaled)[::-1][:count].mean())
    if kind == "quantile":
        return k * float(scaled.std())
    return k * float(scaled.var())


def coverage(indices: tuple[int, ...], evidence: np.ndarray) -> float:
    """max(0, sum of the snippet's attributions / sum of the positive attributions)."""
    total = float(np.maximum(evidence, 0.0).sum())
    return max(0.0, float(evidence[list(indices)].sum()) / total) if total > 0 else 0.0


def span_filters(length: int) -> list[tuple[int, ...]]:
    """Centred runs of ones of odd length >= 3: for 5, 01110 and 11111."""
    filters = []
    for ones in range(3, length + 1, 2):
        offset = (length - ones) // 2
        filters.append(tuple(1 if offset <= i < offset + ones else 0 for i in range(length)))
    return filters


def convolution_filters(length: int) -> list[tuple[int, ...]]:
    """Every arrangement of i ones in `length` slots, 2 <= i <= length - 2 (20 filters for 5): gapped phrases."""
    filters = []
    for ones in range(2, length - 1):
        for positions in itertools.combinations(range(length), ones):
            filters.append(tuple(1 if i in positions else 0 for i in range(length)))
    return filters


def search(evidence: np.ndarray, filters: list[tuple[int, ...]], theta: float) -> list[Snippet]:
    """Slide each filter over the text; keep the index sets whose window score exceeds θ and whose tokens
    under the filter's ones all carry this sign's evidence (>= 0). De-duplicated (best score kept), best first, ties in text order."""
    scaled = normalised(evidence)
    best: dict[tuple[int, ...], float] = {}
    for pattern in filters:
        ones = np.flatnonzero(pattern)
        for start in range(len(scaled) - len(pattern) + 1):
            values = scaled[start + ones]
            if (values < 0).any():
                continue
            score = float(values.mean())
            indices = tuple(int(i) for i in start + ones)
            if score > theta and score > best.get(indices, -np.inf):
                best[indices] = score
    # Equal scores in text order, so the ranking does not depend on the order the filters are tried in.
    ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    return [Snippet(indices, score, coverage(indices, evidence)) for indices, score in ranked]


def compare(spans: list[Snippet], convolutions: list[Snippet]) -> list[Snippet]:
    """The index sets both searches found, by coverage, highest first."""
    found = {snippet.indices for snippet in convolutions}
    return sorted((s for s in spans if s.indices in found), key=lambda s: -s.coverage)


def total_order(evidence: np.ndarray) -> list[Snippet]:
    """Single tokens carrying this sign's evidence, by attribution (highest first; ties in text order)."""
    order = np.argsort(-evidence, kind="stable")
    return [Snippet((int(i),), float(evidence[i]), coverage((int(i),), evidence)) for i in order if evidence[i] > 0]


def merge_runs(indices: set[int]) -> list[tuple[int, ...]]:
    """Sorted positions merged into runs of consecutive positions."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [tuple(run) for run in runs]


def trimmed(run: tuple[int, ...], evidence: np.ndarray) -> tuple[int, ...]:
    """The run without the tokens at its ends that carry none of this sign's evidence (ours: SMV keeps them,
    so a strong token among zeros became a phrase of zeros)."""
    carrying = [k for k, i in enumerate(run) if evidence[i] > 0]
    return run[carrying[0] : carrying[-1] + 1] if carrying else ()


def summary(evidence: np.ndarray, spans: list[Snippet], convolutions: list[Snippet], top_k: int, keep_all: bool) -> list[Snippet]:
    """SMV's summary: the union of the top-k snippets by coverage of the convolution search, the span search
    and single tokens, merged into runs of consecutive tokens (trimmed of ends without evidence); the runs with coverage at or above the
    75th percentile of the runs' coverages are kept (all of them when `keep_all`), the top run always; by coverage."""
    by_coverage = [sorted(found, key=lambda s: -s.coverage)[:top_k] for found in (convolutions, spans)]
    singles = sorted(total_order(evidence), key=lambda s: -s.coverage)[:top_k]
    union = {i for found in [*by_coverage, singles] for snippet in found for i in snippet.indices}
    runs = [Snippet(run, 0.0, coverage(run, evidence)) for run in (trimmed(run, evidence) for run in merge_runs(union)) if run]
    if not runs:
        return []
    runs.sort(key=lambda s: -s.coverage)
    if keep_all:
        return runs
    cut = float(np.percentile([r.coverage for r in runs], 75))
    return runs[:1] + [r for r in runs[1:] if r.coverage >= cut]
