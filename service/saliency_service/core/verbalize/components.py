"""Components template: the blobs the strong positive evidence forms (METRICS.md §10, image adaptation).

The positive part of the map is thresholded at a fraction of its maximum and split into
8-connected components. A component's share is the positive map summed over its pixels divided by
the positive total of the whole map (SMV's coverage, so weak evidence outside every blob still
counts in the denominator); its size is its pixel count over the image area.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from saliency_service.core.params import ParamSpec
from saliency_service.core.types import Fact, Verbalization
from saliency_service.core.verbalize.base import TEMPLATES, Template, VerbalizeInput
from saliency_service.core.verbalize.grid import NO_EVIDENCE, cell_bounds, checked_map, percent, prediction_sentences, region_name

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def cell_index(coordinate: float, bounds: list[int]) -> int:
    """Which third a (sub-pixel) coordinate falls in; pixel i spans [i - 0.5, i + 0.5), so the
    coordinate belongs to the cell of the pixel it rounds to (halves up)."""
    return sum(coordinate + 0.5 >= bound for bound in bounds[1:3])


@TEMPLATES.register("components")
class Components(Template):
    description = (
        "Describes the connected blobs of strong positive evidence: where each lies on a 3x3 grid, "
        "how much of the image it covers and its share of the positive evidence."
    )
    params = (
        ParamSpec(
            "threshold",
            "float",
            0.5,
            # Above 0: a zero threshold would merge the zero-valued background into one blob.
            "Pixels at or above this fraction of the map's maximum form blobs.",
            minimum=0.01,
            maximum=1.0,
        ),
        ParamSpec("max_regions", "int", 2, "Most blobs to describe.", minimum=1, maximum=9),
    )

    def render(self, request: VerbalizeInput) -> Verbalization:
        saliency = checked_map(request.saliency, self.name)
        threshold, max_regions = float(request.params["threshold"]), int(request.params["max_regions"])
        sentences = prediction_sentences(request)

        positive = np.maximum(saliency.astype(np.float64), 0.0)
        total = positive.sum()
        if total <= 0:
            sentences.append(NO_EVIDENCE)
            return Verbalization(text=" ".join(sentences), facts=(), template=self.name)

        mask = positive >= threshold * positive.max()
        labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        indices = np.arange(1, count + 1)
        shares = np.asarray(ndimage.sum(positive, labels, indices)) / total
        sizes = np.asarray(ndimage.sum(mask, labels, indices)) / saliency.size
        # Evidence-weighted centres: a blob's position is where its evidence concentrates.
        centres = ndimage.center_of_mass(positive, labels, indices)
        rows, columns = cell_bounds(saliency.shape[0]), cell_bounds(saliency.shape[1])

        # Stable sort: equal shares keep label order (reading order of each blob's first pixel).
        ranked = [int(i) for i in np.argsort(-shares, kind="stable")[:max_regions]]
        cells = [region_name(cell_index(centres[i][0], rows), cell_index(centres[i][1], columns)) for i in ranked]
        facts = tuple(
            Fact(region=f"{cell} blob", share=float(shares[i]), sign="positive", rank=rank)
            for rank, (i, cell) in enumerate(zip(ranked, cells, strict=True))
        )

        clauses = []
        for rank, (i, cell) in enumerate(zip(ranked, cells, strict=True)):
            # The first clause spells out its units; the rest follow its pattern.
            image, evidence = (" of the image", " of the positive evidence") if rank == 0 else ("", "")
            clauses.append(f"one in the {cell} covering {percent(sizes[i])}%{image} holds {percent(shares[i])}%{evidence}")
        noun = "blob" if count == 1 else "blobs"
        # When blobs are left out, say how many are described so the count does not mislead.
        lead = f"The evidence forms {count} {noun}" + (f"; the {len(ranked)} strongest" if len(ranked) < count else "")
        sentences.append(f"{lead}: " + "; ".join(clauses) + ".")
        return Verbalization(text=" ".join(sentences), facts=facts, template=self.name)
