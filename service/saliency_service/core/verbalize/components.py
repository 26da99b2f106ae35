"""Components template: the blobs the strong evidence forms (METRICS.md §10, image adaptation).

The evidence of one sign is thresholded at a fraction of its maximum and split into 8-connected
components. A component's share is that evidence summed over its pixels divided by the sign's total
over the whole map (SMV's coverage, so weak evidence outside every blob still counts in the
denominator); its size is its pixel count over the image area.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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
from saliency_service.core.verbalize.grid import cell_bounds, checked_map, region_name, signed_part

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def cell_index(coordinate: float, bounds: list[int]) -> int:
    """Which third a (sub-pixel) coordinate falls in; pixel i spans [i - 0.5, i + 0.5), so the
    coordinate belongs to the cell of the pixel it rounds to (halves up)."""
    return sum(coordinate + 0.5 >= bound for bound in bounds[1:3])


@TEMPLATES.register("components")
class Components(Template):
    description = (
        "Describes the connected blobs of strong evidence: where each lies on a 3x3 grid, "
        "how much of the image it covers and its share of the evidence."
    )
    params = (
        ParamSpec(
            "threshold",
            "float",
            0.5,
            # Above 0: a zero threshold would merge the zero-valued background into one blob.
            "Pixels at or above this fraction of the evidence's maximum form blobs.",
            minimum=0.01,
            maximum=1.0,
        ),
        ParamSpec("max_regions", "int", 2, "Most blobs to describe (detail 'short': 1; 'detailed': all).", minimum=1, maximum=9),
        sign_param("negative blobs are those of the negated map"),
    )
    texts = {
        "components.lead": frozenset({"evidence", "count"}),
        "components.lead_one": frozenset({"evidence"}),
        "components.strongest": frozenset({"shown"}),
        "components.first": frozenset({"region", "size", "percent", "evidence"}),
        "components.more": frozenset({"region", "size", "percent"}),
        "components.focus": frozenset({"region"}),
    }

    def describe(self, request: VerbalizeInput) -> Described:
        saliency = checked_map(request.saliency, self.name)
        threshold = float(request.params["threshold"])
        limit = how_many(request, int(request.params["max_regions"]))
        sentences: list[str] = []
        facts: list[Fact] = []
        for sign in signs(request):
            evidence = signed_part(saliency, sign)
            total = evidence.sum()
            if total <= 0:
                sentences.append(request.say("none.map", sign=sign))
                continue
            mask = evidence >= threshold * evidence.max()
            labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
            indices = np.arange(1, count + 1)
            shares = np.asarray(ndimage.sum(evidence, labels, indices)) / total
            sizes = np.asarray(ndimage.sum(mask, labels, indices)) / saliency.size
            # Evidence-weighted centres: a blob's position is where its evidence concentrates.
            centres = ndimage.center_of_mass(evidence, labels, indices)
            rows, columns = cell_bounds(saliency.shape[0]), cell_bounds(saliency.shape[1])

            # Stable sort: equal shares keep label order (reading order of each blob's first pixel).
            ranked = [int(i) for i in np.argsort(-shares, kind="stable")[:limit]]
            cells = [region_name(cell_index(centres[i][0], rows), cell_index(centres[i][1], columns)) for i in ranked]
            facts += [
                Fact(region=f"{cell} blob", share=float(shares[i]), sign=sign, rank=rank, kind="component", value=float(sizes[i]))
                for rank, (i, cell) in enumerate(zip(ranked, cells, strict=True))
            ]
            noun = evidence_noun(request, sign)
            clauses = [
                # The first clause spells out its units; the rest follow its pattern.
                request.say("components.first", region=cell, size=percent(sizes[i]), percent=percent(shares[i]), evidence=noun)
                if rank == 0
                else request.say("components.more", region=cell, size=percent(sizes[i]), percent=percent(shares[i]))
                for rank, (i, cell) in enumerate(zip(ranked, cells, strict=True))
            ]
            lead = (
                request.say("components.lead_one", evidence=noun)
                if count == 1
                else request.say("components.lead", evidence=noun, count=count)
            )
            # When blobs are left out, say how many are described so the count does not mislead.
            if len(ranked) < count:
                lead += request.say("components.strongest", shown=len(ranked))
            sentences.append(f"{lead}: " + "; ".join(clauses) + ".")
        top = next((f for f in facts if f.sign == "positive"), None)
        if top is None:
            return Described(tuple(sentences), tuple(facts))
        return Described(
            tuple(sentences),
            tuple(facts),
            request.say("components.focus", region=top.region.removesuffix(" blob")),
            str(percent(top.share)),
        )
