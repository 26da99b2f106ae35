"""Grid-region template: where on a 3x3 grid the positive evidence lies (METRICS.md §10, image adaptation).

A region's attribution is the sum of the map's positive part inside its cell; its share is that over
the positive total (SMV's coverage). Negative values are never counted as evidence.
"""

from __future__ import annotations

import math

import numpy as np

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.params import ParamSpec
from saliency_service.core.types import Fact, Verbalization
from saliency_service.core.verbalize.base import TEMPLATES, Template, VerbalizeInput

ROWS = ("top", "centre", "bottom")
COLUMNS = ("left", "centre", "right")
NO_EVIDENCE = "The map holds no positive evidence."


def region_name(row: int, column: int) -> str:
    """'top left', 'centre', 'bottom centre', ...: the middle cell is just 'centre'."""
    if row == 1 and column == 1:
        return "centre"
    return f"{ROWS[row]} {COLUMNS[column]}"


REGIONS = tuple(region_name(row, column) for row in range(3) for column in range(3))


def cell_bounds(size: int) -> list[int]:
    """Boundaries of three cells along an axis: round(i * size / 3), i = 0..3."""
    return [round(i * size / 3) for i in range(4)]


def region_evidence(saliency: np.ndarray) -> np.ndarray:
    """Sum of the positive part of the map in each 3x3 cell, row-major (the order of REGIONS)."""
    positive = np.maximum(saliency.astype(np.float64), 0.0)
    rows, columns = cell_bounds(saliency.shape[0]), cell_bounds(saliency.shape[1])
    return np.array([positive[rows[r] : rows[r + 1], columns[c] : columns[c + 1]].sum() for r in range(3) for c in range(3)])


def percent(share: float) -> int:
    """Share as a whole percentage, halves rounded up (not Python's half-to-even)."""
    return math.floor(100 * share + 0.5)


@TEMPLATES.register("grid_regions")
class GridRegions(Template):
    description = "Names the 3x3 grid cells that hold the most positive evidence, with each cell's share of it."
    params = (
        ParamSpec("max_regions", "int", 2, "Most regions to name.", minimum=1, maximum=9),
        ParamSpec(
            "min_share",
            "float",
            0.1,
            "Regions holding less than this share of the positive evidence are not named (the top region always is).",
            minimum=0.0,
            maximum=1.0,
        ),
    )

    def render(self, request: VerbalizeInput) -> Verbalization:
        saliency = np.asarray(request.saliency)
        if saliency.ndim != 2 or saliency.size == 0:
            raise InvalidArgument("INVALID_SALIENCY", f"{self.name}: the map must be a non-empty H x W array, got shape {saliency.shape}")
        if not np.isfinite(saliency).all():
            raise InvalidArgument("NON_FINITE_SALIENCY", f"{self.name}: the map contains NaN or infinity")

        sentences = []
        if request.label is not None:
            confidence = f" ({request.probability:.2f})" if request.probability is not None else ""
            sentences.append(f"The model predicts '{request.label}'{confidence}.")

        evidence = region_evidence(saliency)
        total = evidence.sum()
        if total <= 0:
            sentences.append(NO_EVIDENCE)
            return Verbalization(text=" ".join(sentences), facts=(), template=self.name)

        shares = evidence / total
        # Stable sort: equal shares keep reading order (top left first).
        ranked = np.argsort(-shares, kind="stable")
        max_regions, min_share = int(request.params["max_regions"]), float(request.params["min_share"])
        named = [int(ranked[0])] + [int(i) for i in ranked[1:max_regions] if shares[i] >= min_share]
        facts = tuple(Fact(region=REGIONS[i], share=float(shares[i]), sign="positive", rank=rank) for rank, i in enumerate(named))

        clauses = [f"{percent(facts[0].share)}% of the positive evidence lies in the {facts[0].region} region"]
        clauses += [f"{fact.region} adds {percent(fact.share)}%" for fact in facts[1:]]
        sentences.append("; ".join(clauses) + ".")
        return Verbalization(text=" ".join(sentences), facts=facts, template=self.name)
