"""Named-regions template: the share of the evidence inside each region the caller named (METRICS.md §10,
image adaptation: labelled masks as the units).

A region's share is the evidence of one sign summed over its mask (resized to the map) divided by that
sign's total over the whole map. Regions may overlap, so their shares may add up to more than 100%;
the evidence inside no region is stated as well, so the text never overstates what the regions explain.
"""

from __future__ import annotations

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
from saliency_service.core.verbalize.grid import checked_map, ranked_facts, signed_part


@TEMPLATES.register("named_regions")
class NamedRegions(Template):
    description = (
        "Names the caller's regions (`regions`: name and mask) that hold the most evidence, with each one's share, "
        "and the share outside every region."
    )
    params = (
        ParamSpec("max_regions", "int", 3, "Most regions to name (detail 'short': 1; 'detailed': all).", minimum=1, maximum=1000),
        ParamSpec(
            "min_share",
            "float",
            0.0,
            "Regions holding less than this share of the evidence are not named (the top region always is).",
            minimum=0.0,
            maximum=1.0,
        ),
        sign_param("each sign's shares are of that sign's total"),
    )
    uses_regions = True
    texts = {
        "named_regions.first": frozenset({"percent", "evidence", "region"}),
        "named_regions.more": frozenset({"percent", "region"}),
        "named_regions.outside": frozenset({"percent"}),
        "named_regions.all_outside": frozenset({"evidence"}),
        "named_regions.focus": frozenset({"region"}),
    }

    def describe(self, request: VerbalizeInput) -> Described:
        saliency = checked_map(request.saliency, self.name)
        if not request.regions:
            raise InvalidArgument(
                "REGIONS_REQUIRED", f"template '{self.name}' describes caller-named regions; send `regions` (name and mask)"
            )
        names = [name for name, _ in request.regions]
        masks = np.stack([mask for _, mask in request.regions]).astype(bool)
        if masks.shape[1:] != saliency.shape:
            raise InvalidArgument(
                "REGION_SHAPE_MISMATCH", f"region masks are {list(masks.shape[1:])}, the map {list(saliency.shape)}; resize them to the map"
            )
        limit = how_many(request, int(request.params["max_regions"]))
        min_share = float(request.params["min_share"])
        sentences: list[str] = []
        facts: tuple[Fact, ...] = ()
        for sign in signs(request):
            evidence = signed_part(saliency, sign)
            total = evidence.sum()
            if total <= 0:
                sentences.append(request.say("none.map", sign=sign))
                continue
            shares = np.array([evidence[mask].sum() for mask in masks]) / total
            outside = float(evidence[~masks.any(axis=0)].sum() / total)
            noun = evidence_noun(request, sign)
            if shares.max() <= 0:
                named: tuple[Fact, ...] = ()
                sentences.append(request.say("named_regions.all_outside", evidence=noun))
            else:
                named = ranked_facts(shares, names, sign, limit, min_share)
                clauses = [request.say("named_regions.first", percent=percent(named[0].share), evidence=noun, region=named[0].region)]
                clauses += [request.say("named_regions.more", percent=percent(f.share), region=f.region) for f in named[1:]]
                clauses.append(request.say("named_regions.outside", percent=percent(outside)))
                sentences.append("; ".join(clauses) + ".")
            facts += named + (Fact(region="", share=outside, sign=sign, rank=len(named), kind="outside"),)
        top = next((f for f in facts if f.sign == "positive" and f.kind == "region"), None)
        if top is None:
            return Described(tuple(sentences), facts)
        return Described(tuple(sentences), facts, request.say("named_regions.focus", region=top.region), str(percent(top.share)))
