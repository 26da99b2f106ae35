"""Grid-region template: where on a 3x3 grid the evidence lies (METRICS.md §10, image adaptation).

A region's attribution is the sum of the map's positive part inside its cell; its share is that over
the positive total (SMV's coverage). Negative values never count as positive evidence; with `sign`
set to negative or both, the negative part is described the same way, as evidence against the class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.params import ParamSpec
from saliency_service.core.types import Fact
from saliency_service.core.verbalize.base import (
    TEMPLATES,
    Described,
    Template,
    VerbalizeInput,
    evidence_noun,
    how_many,
    percent,
    sign_param,
    signs,
)

ROWS = ("top", "centre", "bottom")
COLUMNS = ("left", "centre", "right")


def region_name(row: int, column: int) -> str:
    """'top left', 'centre', 'bottom centre', ...: the middle cell is just 'centre'."""
    if row == 1 and column == 1:
        return "centre"
    return f"{ROWS[row]} {COLUMNS[column]}"


REGIONS = tuple(region_name(row, column) for row in range(3) for column in range(3))


def cell_bounds(size: int) -> list[int]:
    """Boundaries of three cells along an axis: round(i * size / 3), i = 0..3."""
    return [round(i * size / 3) for i in range(4)]


def signed_part(saliency: np.ndarray, sign: str) -> np.ndarray:
    """The evidence of one sign as non-negative float64 values: max(map, 0), or max(-map, 0) for negative."""
    values = saliency.astype(np.float64)
    return np.maximum(values if sign == "positive" else -values, 0.0)


def region_evidence(saliency: np.ndarray) -> np.ndarray:
    """Sum of the positive part of the map in each 3x3 cell, row-major (the order of REGIONS)."""
    positive = signed_part(saliency, "positive")
    rows, columns = cell_bounds(saliency.shape[0]), cell_bounds(saliency.shape[1])
    return np.array([positive[rows[r] : rows[r + 1], columns[c] : columns[c + 1]].sum() for r in range(3) for c in range(3)])


def checked_map(saliency: np.ndarray | None, owner: str) -> np.ndarray:
    """The map as an array, or InvalidArgument when it is not a finite, non-empty H x W map."""
    if saliency is None:
        raise InvalidArgument("SALIENCY_REQUIRED", f"{owner} describes an image map; send `saliency` maps or a model, images and method")
    saliency = np.asarray(saliency)
    if saliency.ndim != 2 or saliency.size == 0:
        raise InvalidArgument("INVALID_SALIENCY", f"{owner}: the map must be a non-empty H x W array, got shape {saliency.shape}")
    if not np.isfinite(saliency).all():
        raise InvalidArgument("NON_FINITE_SALIENCY", f"{owner}: the map contains NaN or infinity")
    return saliency


def ranked_facts(shares: np.ndarray, names: Sequence[str], sign: str, limit: int | None, min_share: float) -> tuple[Fact, ...]:
    """Units by descending share, at most `limit` (None: all), those below `min_share` or empty left out; the top one always named."""
    # Stable sort: equal shares keep the units' order (reading order for the grid).
    ranked = [int(i) for i in np.argsort(-shares, kind="stable")]
    named = ranked[:1] + [i for i in ranked[1:limit] if shares[i] >= min_share and shares[i] > 0]
    return tuple(Fact(region=names[i], share=float(shares[i]), sign=sign, rank=rank) for rank, i in enumerate(named))


@TEMPLATES.register("grid_regions")
class GridRegions(Template):
    description = "Names the 3x3 grid cells that hold the most positive (or negative) evidence, with each cell's share of it."
    params = (
        ParamSpec("max_regions", "int", 2, "Most regions to name (detail 'short': 1; 'detailed': all nine).", minimum=1, maximum=9),
        ParamSpec(
            "min_share",
            "float",
            0.1,
            "Regions holding less than this share of the evidence are not named (the top region always is).",
            minimum=0.0,
            maximum=1.0,
        ),
        sign_param("each sign's shares are of that sign's total"),
    )
    texts = {
        "grid_regions.first": frozenset({"percent", "evidence", "region"}),
        "grid_regions.more": frozenset({"percent", "region"}),
        "grid_regions.focus": frozenset({"region"}),
    }

    def describe(self, request: VerbalizeInput) -> Described:
        saliency = checked_map(request.saliency, self.name)
        limit = how_many(request, int(request.params["max_regions"]))
        min_share = float(request.params["min_share"])
        sentences: list[str] = []
        facts: tuple[Fact, ...] = ()
        for sign in signs(request):
            evidence = region_evidence(saliency if sign == "positive" else -saliency.astype(np.float64))
            if evidence.sum() <= 0:
                sentences.append(request.say("none.map", sign=sign))
                continue
            named = ranked_facts(evidence / evidence.sum(), REGIONS, sign, limit, min_share)
            first, rest = named[0], named[1:]
            clauses = [
                request.say("grid_regions.first", percent=percent(first.share), evidence=evidence_noun(request, sign), region=first.region)
            ]
            clauses += [request.say("grid_regions.more", percent=percent(f.share), region=f.region) for f in rest]
            sentences.append("; ".join(clauses) + ".")
            facts += named
        top = next((f for f in facts if f.sign == "positive"), None)
        if top is None:
            return Described(tuple(sentences), facts)
        return Described(tuple(sentences), facts, request.say("grid_regions.focus", region=top.region), str(percent(top.share)))
