"""Grid-region template: where on a 3x3 grid the evidence lies (METRICS.md §10, image adaptation).

A region's attribution is the sum of the map's positive part inside its cell; its share is that over
the positive total (SMV's coverage). Negative values never count as positive evidence; with `sign`
set to negative or both, the negative part is described the same way, as evidence against the class.
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
NO_NEGATIVE_EVIDENCE = "The map holds no negative evidence."
SIGNS = ("positive", "negative", "both")


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


def checked_map(saliency: np.ndarray, owner: str) -> np.ndarray:
    """The map as an array, or InvalidArgument when it is not a finite, non-empty H x W map."""
    saliency = np.asarray(saliency)
    if saliency.ndim != 2 or saliency.size == 0:
        raise InvalidArgument("INVALID_SALIENCY", f"{owner}: the map must be a non-empty H x W array, got shape {saliency.shape}")
    if not np.isfinite(saliency).all():
        raise InvalidArgument("NON_FINITE_SALIENCY", f"{owner}: the map contains NaN or infinity")
    return saliency


def prediction_sentences(request: VerbalizeInput) -> list[str]:
    """The opening sentence naming the prediction, or none when no model is involved."""
    if request.label is None:
        return []
    confidence = f" ({request.probability:.2f})" if request.probability is not None else ""
    return [f"The model predicts '{request.label}'{confidence}."]


def _ranked_facts(evidence: np.ndarray, sign: str, max_regions: int, min_share: float) -> tuple[Fact, ...]:
    """Regions by descending share of `evidence` (its total must be > 0); the top one always named."""
    shares = evidence / evidence.sum()
    # Stable sort: equal shares keep reading order (top left first).
    ranked = np.argsort(-shares, kind="stable")
    named = [int(ranked[0])] + [int(i) for i in ranked[1:max_regions] if shares[i] >= min_share]
    return tuple(Fact(region=REGIONS[i], share=float(shares[i]), sign=sign, rank=rank) for rank, i in enumerate(named))


def _sentence(facts: tuple[Fact, ...], subject: str) -> str:
    clauses = [f"{percent(facts[0].share)}% of the {subject} lies in the {facts[0].region} region"]
    clauses += [f"{fact.region} adds {percent(fact.share)}%" for fact in facts[1:]]
    return "; ".join(clauses) + "."


@TEMPLATES.register("grid_regions")
class GridRegions(Template):
    description = "Names the 3x3 grid cells that hold the most positive (or negative) evidence, with each cell's share of it."
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
        ParamSpec(
            "sign",
            "string",
            "positive",
            "Which evidence to describe: positive (for the class), negative (against it), or both, positive first.",
            choices=SIGNS,
        ),
    )

    def render(self, request: VerbalizeInput) -> Verbalization:
        saliency = checked_map(request.saliency, self.name)
        sentences = prediction_sentences(request)
        max_regions, min_share = int(request.params["max_regions"]), float(request.params["min_share"])
        sign = str(request.params["sign"])
        facts: tuple[Fact, ...] = ()

        if sign in ("positive", "both"):
            evidence = region_evidence(saliency)
            if evidence.sum() <= 0:
                sentences.append(NO_EVIDENCE)
            else:
                positive = _ranked_facts(evidence, "positive", max_regions, min_share)
                sentences.append(_sentence(positive, "positive evidence"))
                facts += positive

        if sign in ("negative", "both"):
            # The negative part of the map is the positive part of its negation.
            evidence = region_evidence(-saliency.astype(np.float64))
            if evidence.sum() <= 0:
                sentences.append(NO_NEGATIVE_EVIDENCE)
            else:
                negative = _ranked_facts(evidence, "negative", max_regions, min_share)
                against = f" (against '{request.label}')" if request.label is not None else ""
                sentences.append(_sentence(negative, f"negative evidence{against}"))
                facts += negative

        return Verbalization(text=" ".join(sentences), facts=facts, template=self.name)
