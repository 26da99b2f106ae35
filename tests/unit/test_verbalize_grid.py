"""grid_regions: every number in the text is checked against shares recomputed here from the map."""

from __future__ import annotations

import re

import numpy as np
import pytest

from saliency_service.core.params import resolve_params
from saliency_service.core.types import Verbalization
from saliency_service.core.verbalize import TEMPLATES, VerbalizeInput

NAMES = [
    ["top left", "top centre", "top right"],
    ["centre left", "centre", "centre right"],
    ["bottom left", "bottom centre", "bottom right"],
]
FIRST = re.compile(r"(\d+)% of the positive evidence lies in the ([a-z ]+?) region")
MORE = re.compile(r"; ([a-z ]+?) adds (\d+)%")


def _render(saliency: np.ndarray, label: str | None = None, probability: float | None = None, **params: object) -> Verbalization:
    cls = TEMPLATES.get("grid_regions")
    resolved = resolve_params(cls.params, params, "grid_regions")
    return cls().render(VerbalizeInput(saliency=saliency, label=label, probability=probability, params=resolved))


def _shares(saliency: np.ndarray) -> dict[str, float]:
    """Pixel by pixel: which third of each axis the pixel falls in (boundary round(i*size/3))."""
    height, width = saliency.shape
    totals = {name: 0.0 for row in NAMES for name in row}
    for r in range(height):
        for c in range(width):
            row = sum(r >= round(i * height / 3) for i in (1, 2))
            column = sum(c >= round(i * width / 3) for i in (1, 2))
            totals[NAMES[row][column]] += max(float(saliency[r, c]), 0.0)
    grand = sum(totals.values())
    return {name: value / grand for name, value in totals.items()}


def _claims(text: str) -> list[tuple[str, int]]:
    first = FIRST.search(text)
    assert first is not None, text
    return [(first.group(2), int(first.group(1)))] + [(name, int(p)) for name, p in MORE.findall(text)]


@pytest.mark.parametrize(("shape", "seed"), [((20, 28), 0), ((7, 10), 1), ((128, 128), 2), ((3, 3), 3), ((31, 17), 4)])
@pytest.mark.parametrize("max_regions", [1, 2, 9])
def test_every_percentage_matches_the_map(shape: tuple[int, int], seed: int, max_regions: int) -> None:
    # Signed noise with a random tilt, so cells differ and negative values are present.
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]]
    tilt = rng.standard_normal(2) @ np.stack([rows / shape[0], columns / shape[1]]).reshape(2, -1)
    saliency = (rng.standard_normal(shape) + tilt.reshape(shape)).astype(np.float32)
    result = _render(saliency, max_regions=max_regions, min_share=0.05)
    shares = _shares(saliency)
    ranked = sorted(shares, key=lambda name: -shares[name])
    claims = _claims(result.text)
    assert [name for name, _ in claims] == ranked[: len(claims)], result.text
    assert len(claims) == max(1, sum(1 for name in ranked[:max_regions] if shares[name] >= 0.05))
    for name, percent in claims:
        assert abs(percent - 100 * shares[name]) <= 0.5, (name, percent, shares[name])
    assert [fact.region for fact in result.facts] == [name for name, _ in claims]
    for rank, fact in enumerate(result.facts):
        assert fact.rank == rank
        assert fact.share == pytest.approx(shares[fact.region], rel=1e-9)
    assert result.template == "grid_regions"


def test_all_mass_in_the_centre_cell() -> None:
    saliency = np.zeros((9, 9), np.float32)
    saliency[3:6, 3:6] = 1.0
    result = _render(saliency)
    assert result.text == "100% of the positive evidence lies in the centre region."
    assert [(f.region, f.share) for f in result.facts] == [("centre", 1.0)]


def test_a_seventy_thirty_split_names_both_cells_in_order() -> None:
    saliency = np.zeros((12, 12), np.float32)
    saliency[0:4, 0:4] = 0.3 / 16
    saliency[8:12, 8:12] = 0.7 / 16
    result = _render(saliency, label="star", probability=0.97)
    assert result.text == (
        "The model predicts 'star' (0.97). 70% of the positive evidence lies in the bottom right region; top left adds 30%."
    )
    prediction, *regions = result.facts
    assert (prediction.kind, prediction.region, prediction.value) == ("prediction", "star", 0.97)
    assert [f.region for f in regions] == ["bottom right", "top left"]
    assert [f.share for f in regions] == pytest.approx([0.7, 0.3])


def test_negative_regions_are_not_evidence() -> None:
    saliency = np.zeros((9, 9), np.float32)
    saliency[3:6, 3:6] = 1.0
    saliency[0:3, 0:3] = -50.0
    saliency[6:9, 6:9] = 0.5 - np.eye(3, dtype=np.float32)  # mixed: only its positive part counts
    result = _render(saliency)
    expected = 6 * 0.5 / (9 + 6 * 0.5)
    assert _claims(result.text) == [("centre", round(100 * (1 - expected))), ("bottom right", round(100 * expected))]
    assert all(f.region != "top left" for f in result.facts)


@pytest.mark.parametrize("saliency", [np.zeros((6, 6), np.float32), -np.ones((6, 6), np.float32)])
def test_no_positive_evidence(saliency: np.ndarray) -> None:
    result = _render(saliency, label="circle", probability=0.5)
    assert result.text == "The model predicts 'circle' (0.50). The map holds no positive evidence."
    assert [f.kind for f in result.facts] == ["prediction"]
    assert _render(saliency).text == "The map holds no positive evidence."


def test_small_regions_are_not_named_but_the_top_one_always_is() -> None:
    uniform = np.ones((9, 9), np.float32)
    result = _render(uniform, max_regions=9, min_share=0.5)
    assert _claims(result.text) == [("top left", 11)], "equal shares keep reading order; 1/9 < min_share yet the top region is named"
    saliency = np.zeros((9, 9), np.float32)
    saliency[0:3, 0:3], saliency[0:3, 3:6], saliency[0:3, 6:9] = 0.6, 0.35, 0.05
    assert [f.region for f in _render(saliency, max_regions=3).facts] == ["top left", "top centre"]


def test_uneven_cells_use_rounded_boundaries() -> None:
    # round(10/3) = 3 and round(20/3) = 7: rows and columns are 3, 4, 3 pixels.
    result = _render(np.ones((10, 10), np.float32), max_regions=9, min_share=0.0)
    facts = {f.region: f.share for f in result.facts}
    assert facts["centre"] == pytest.approx(0.16)
    assert facts["top left"] == pytest.approx(0.09)
    assert facts["top centre"] == pytest.approx(0.12)
    assert result.facts[0].region == "centre"


def test_label_without_probability() -> None:
    assert _render(np.ones((3, 3), np.float32), label="cross").text.startswith("The model predicts 'cross'. ")
