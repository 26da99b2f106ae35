"""grid_regions' `sign` and the components template: every percentage in the text is parsed back and
checked against values recomputed here from the map (hand-made maps with known answers, and a
flood fill written independently of scipy for random maps)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.params import resolve_params
from saliency_service.core.types import Verbalization
from saliency_service.core.verbalize import TEMPLATES, VerbalizeInput

NAMES = [
    ["top left", "top centre", "top right"],
    ["centre left", "centre", "centre right"],
    ["bottom left", "bottom centre", "bottom right"],
]
POSITIVE = re.compile(r"(\d+)% of the positive evidence lies in the ([a-z ]+?) region")
NEGATIVE = re.compile(r"(\d+)% of the negative evidence(?: \(against '[^']*'\))? lies in the ([a-z ]+?) region")
MORE = re.compile(r"; ([a-z ]+?) adds (\d+)%")
BLOB = re.compile(r"one in the ([a-z ]+?) covering (\d+)%(?: of the image)? holds (\d+)%")
COUNT = re.compile(r"The positive evidence forms (\d+) blobs?")


def _render(
    template: str, saliency: np.ndarray, label: str | None = None, probability: float | None = None, **params: object
) -> Verbalization:
    cls = TEMPLATES.get(template)
    resolved = resolve_params(cls.params, params, template)
    return cls().render(VerbalizeInput(saliency=saliency, label=label, probability=probability, params=resolved))


def _cell(r: float, c: float, shape: tuple[int, ...]) -> str:
    """Grid cell of a (sub-pixel) point: the cell of the pixel it rounds to, halves up."""
    row, column = math.floor(r + 0.5), math.floor(c + 0.5)
    return NAMES[sum(row >= round(i * shape[0] / 3) for i in (1, 2))][sum(column >= round(i * shape[1] / 3) for i in (1, 2))]


def _grid_claims(text: str, first: re.Pattern[str]) -> list[tuple[str, int]]:
    """The named regions of one sentence (the one `first` opens), with their percentages."""
    match = first.search(text)
    assert match is not None, text
    sentence = text[match.start() : text.index(".", match.end())]
    return [(match.group(2), int(match.group(1)))] + [(name, int(p)) for name, p in MORE.findall(sentence)]


def _blob_claims(text: str) -> list[tuple[str, int, int]]:
    return [(cell, int(size), int(share)) for cell, size, share in BLOB.findall(text)]


def _components(saliency: np.ndarray, threshold: float) -> list[tuple[str, float, float]]:
    """(cell, size, share) per 8-connected blob by breadth-first flood fill, strongest first."""
    positive = np.maximum(saliency.astype(np.float64), 0.0)
    mask = positive >= threshold * positive.max()
    height, width = mask.shape
    seen = np.zeros_like(mask)
    blobs = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = [start], []
        while queue:
            r, c = queue.pop()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    nr, nc = r + dr, c + dc
                    if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                        seen[nr, nc] = True
                        queue.append((nr, nc))
        weights = np.array([positive[p] for p in pixels])
        coords = np.array(pixels, dtype=np.float64)
        centre = (weights[:, None] * coords).sum(axis=0) / weights.sum()
        blobs.append((_cell(centre[0], centre[1], mask.shape), len(pixels) / mask.size, weights.sum() / positive.sum()))
    return sorted(blobs, key=lambda blob: -blob[2])


def _signed_blocks() -> np.ndarray:
    saliency = np.zeros((9, 9), np.float32)
    saliency[3:6, 3:6] = 1.0  # positive block: centre
    saliency[0:3, 6:9] = -2.0  # negative block: top right
    return saliency


# --- grid_regions: sign -------------------------------------------------------------------------


def test_negative_names_the_negative_block() -> None:
    result = _render("grid_regions", _signed_blocks(), label="star", probability=0.97, sign="negative")
    assert result.text == "The model predicts 'star' (0.97). 100% of the negative evidence (against 'star') lies in the top right region."
    assert _grid_claims(result.text, NEGATIVE) == [("top right", 100)]
    assert [(f.kind, f.region, f.value) for f in result.facts[:1]] == [("prediction", "star", 0.97)]
    assert [(f.region, f.share, f.sign, f.rank) for f in result.facts[1:]] == [("top right", 1.0, "negative", 0)]
    assert POSITIVE.search(result.text) is None


def test_both_names_the_positive_block_then_the_negative_one() -> None:
    result = _render("grid_regions", _signed_blocks(), sign="both")
    assert (
        result.text
        == "100% of the positive evidence lies in the centre region. 100% of the negative evidence lies in the top right region."
    )
    assert _grid_claims(result.text, POSITIVE) == [("centre", 100)]
    assert _grid_claims(result.text, NEGATIVE) == [("top right", 100)]
    assert [(f.region, f.sign, f.rank) for f in result.facts] == [("centre", "positive", 0), ("top right", "negative", 0)]


def test_default_sign_is_positive_and_unchanged() -> None:
    saliency = _signed_blocks()
    assert _render("grid_regions", saliency).text == _render("grid_regions", saliency, sign="positive").text
    assert _render("grid_regions", saliency).text == "100% of the positive evidence lies in the centre region."


@pytest.mark.parametrize("seed", range(4))
def test_negative_percentages_match_the_map(seed: int) -> None:
    rng = np.random.default_rng(seed)
    saliency = rng.standard_normal((14, 19)).astype(np.float32)
    result = _render("grid_regions", saliency, label="cat", sign="both", max_regions=3, min_share=0.0)
    for sign, pattern, part in (("positive", POSITIVE, np.maximum(saliency, 0)), ("negative", NEGATIVE, np.maximum(-saliency, 0))):
        totals = {name: 0.0 for row in NAMES for name in row}
        for r in range(saliency.shape[0]):
            for c in range(saliency.shape[1]):
                totals[_cell(r, c, saliency.shape)] += float(part[r, c])
        shares = {name: value / sum(totals.values()) for name, value in totals.items()}
        claims = _grid_claims(result.text, pattern)
        assert [name for name, _ in claims] == sorted(shares, key=lambda n: -shares[n])[:3]
        for name, p in claims:
            assert abs(p - 100 * shares[name]) <= 0.5, (sign, name, p, shares[name])
        facts = [f for f in result.facts if f.sign == sign]
        assert [(f.region, f.rank) for f in facts] == [(name, rank) for rank, (name, _) in enumerate(claims)]
        assert [f.share for f in facts] == pytest.approx([shares[name] for name, _ in claims], rel=1e-6)


def test_no_negative_evidence() -> None:
    ones = np.ones((6, 6), np.float32)
    assert _render("grid_regions", ones, sign="negative").text == "The map holds no negative evidence."
    assert _render("grid_regions", ones, sign="negative").facts == ()
    zeros = np.zeros((6, 6), np.float32)
    assert _render("grid_regions", zeros, sign="both").text == "The map holds no positive evidence. The map holds no negative evidence."


# --- components ---------------------------------------------------------------------------------


def _two_blobs() -> np.ndarray:
    """Equal intensity, so shares follow pixel counts: 70 px in the centre, 30 px top left."""
    saliency = np.zeros((30, 30), np.float32)
    saliency[10:17, 10:20] = 1.0  # 7 x 10 = 70 px
    saliency[0:5, 0:6] = 1.0  # 5 x 6 = 30 px
    return saliency


def test_two_blobs_with_a_seventy_thirty_split() -> None:
    result = _render("components", _two_blobs(), label="star", probability=0.97)
    assert result.text == (
        "The model predicts 'star' (0.97). The positive evidence forms 2 blobs: one in the centre covering 8% of the image "
        "holds 70% of the positive evidence; one in the top left covering 3% holds 30%."
    )
    assert _blob_claims(result.text) == [("centre", round(100 * 70 / 900), 70), ("top left", round(100 * 30 / 900), 30)]
    blobs = [f for f in result.facts if f.kind == "component"]
    assert [(f.region, f.sign, f.rank) for f in blobs] == [("centre blob", "positive", 0), ("top left blob", "positive", 1)]
    assert [f.share for f in blobs] == pytest.approx([0.7, 0.3])
    assert [f.value for f in blobs] == pytest.approx([70 / 900, 30 / 900])  # sizes: pixels over the image area
    assert result.template == "components"


def test_max_regions_limits_the_blobs_described() -> None:
    result = _render("components", _two_blobs(), max_regions=1)
    count = COUNT.search(result.text)
    assert count is not None and count.group(1) == "2", result.text
    assert _blob_claims(result.text) == [("centre", 8, 70)]
    assert [f.region for f in result.facts] == ["centre blob"]


def test_a_single_blob_with_weak_evidence_outside_it() -> None:
    saliency = np.zeros((12, 12), np.float32)
    saliency[8:12, 0:3] = 1.0  # 12 px, bottom left
    saliency[0, 11] = 0.25  # below the threshold: not a blob, but still counts in the total
    result = _render("components", saliency)
    assert result.text == (
        "The positive evidence forms 1 blob: one in the bottom left covering 8% of the image holds 98% of the positive evidence."
    )
    assert _blob_claims(result.text) == [("bottom left", round(100 * 12 / 144), round(100 * 12 / 12.25))]
    assert [f.share for f in result.facts] == pytest.approx([12 / 12.25])


def test_diagonal_pixels_join_one_blob() -> None:
    saliency = np.eye(9, dtype=np.float32)  # 8-connectivity: one blob along the diagonal
    result = _render("components", saliency)
    assert _blob_claims(result.text) == [("centre", 11, 100)]


@pytest.mark.parametrize("saliency", [np.zeros((6, 6), np.float32), -np.ones((6, 6), np.float32)])
def test_components_without_positive_evidence(saliency: np.ndarray) -> None:
    result = _render("components", saliency, label="circle", probability=0.5)
    assert result.text == "The model predicts 'circle' (0.50). The map holds no positive evidence."
    assert [f.kind for f in result.facts] == ["prediction"]


def test_threshold_changes_which_pixels_form_blobs() -> None:
    saliency = np.zeros((12, 12), np.float32)
    saliency[5:7, 5:7] = 1.0  # 4 px, centre
    saliency[0:2, 0:2] = 0.4  # 4 px, top left: a blob only when the threshold is at most 0.4
    total = 4 * 1.0 + 4 * 0.4
    high = _render("components", saliency, threshold=0.5)
    assert _blob_claims(high.text) == [("centre", 3, round(100 * 4 / total))]
    low = _render("components", saliency, threshold=0.4)
    assert _blob_claims(low.text) == [("centre", 3, round(100 * 4 / total)), ("top left", 3, round(100 * 1.6 / total))]
    assert len(_render("components", saliency, threshold=1.0).facts) == 1


@pytest.mark.parametrize(("seed", "threshold"), [(0, 0.5), (1, 0.3), (2, 0.7), (3, 0.2)])
def test_random_maps_match_an_independent_flood_fill(seed: int, threshold: float) -> None:
    rng = np.random.default_rng(seed)
    saliency = rng.standard_normal((13, 17)).astype(np.float32)
    result = _render("components", saliency, threshold=threshold, max_regions=9)
    blobs = _components(saliency, threshold)
    count = COUNT.search(result.text)
    assert count is not None and int(count.group(1)) == len(blobs), result.text
    claims = _blob_claims(result.text)
    assert len(claims) == min(9, len(blobs))
    for (cell, size, share), (true_cell, true_size, true_share) in zip(claims, blobs, strict=False):
        assert cell == true_cell
        assert abs(size - 100 * true_size) <= 0.5
        assert abs(share - 100 * true_share) <= 0.5
    assert [f.share for f in result.facts] == pytest.approx([blob[2] for blob in blobs[: len(claims)]], rel=1e-6)


# --- parameter validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "params", "reason"),
    [
        ("grid_regions", {"sign": "neutral"}, "INVALID_PARAMETER"),
        ("grid_regions", {"sign": 1}, "INVALID_PARAMETER"),
        ("components", {"threshold": 1.5}, "PARAMETER_OUT_OF_RANGE"),
        ("components", {"threshold": -0.1}, "PARAMETER_OUT_OF_RANGE"),
        ("components", {"max_regions": 0}, "PARAMETER_OUT_OF_RANGE"),
        ("components", {"max_regions": 10}, "PARAMETER_OUT_OF_RANGE"),
        ("components", {"max_regions": 1.5}, "INVALID_PARAMETER"),
        ("components", {"threshold": "high"}, "INVALID_PARAMETER"),
    ],
)
def test_bad_parameters_are_rejected(template: str, params: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_params(TEMPLATES.get(template).params, params, template)
    assert caught.value.reason == reason


def test_zero_threshold_is_out_of_range() -> None:
    with pytest.raises(InvalidArgument) as caught:
        _render("components", np.ones((3, 3), np.float32), threshold=0.0)
    assert caught.value.reason == "PARAMETER_OUT_OF_RANGE"


def test_defaults() -> None:
    assert resolve_params(TEMPLATES.get("grid_regions").params, {}, "grid_regions")["sign"] == "positive"
    assert resolve_params(TEMPLATES.get("components").params, {}, "components") == {"threshold": 0.5, "max_regions": 2, "sign": "positive"}
