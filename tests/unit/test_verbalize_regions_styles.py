"""named_regions, the framing lines (prediction, correctness, contrast), styles, custom templates and detail.
Percentages in the text are parsed back and checked against shares recomputed here from the map."""

from __future__ import annotations

import re

import numpy as np
import pytest

from saliency_service.core.errors import InvalidArgument, NotFound
from saliency_service.core.params import resolve_params
from saliency_service.core.types import Verbalization
from saliency_service.core.verbalize import TEMPLATES, VerbalizeInput
from saliency_service.core.verbalize.base import Outcome
from saliency_service.core.verbalize.phrasebook import load_styles, phrases_for, schema

FIRST = re.compile(r"(\d+)% of the ([a-z ]+?(?: \(against '[^']*'\))?) lies in '([^']+)'")
MORE = re.compile(r"; '([^']+)' adds (\d+)%")
OUTSIDE = re.compile(r"(\d+)% lies outside the named regions")


def _render(
    template: str,
    saliency: np.ndarray,
    regions: dict[str, np.ndarray] | None = None,
    label: str | None = None,
    probability: float | None = None,
    outcome: Outcome | None = None,
    style: str = "",
    detail: str = "",
    custom: dict[str, str] | None = None,
    **params: object,
) -> Verbalization:
    cls = TEMPLATES.get(template)
    resolved = resolve_params(cls.params, params, template)
    request = VerbalizeInput(
        saliency,
        label,
        probability,
        resolved,
        regions=tuple((regions or {}).items()),
        phrases=phrases_for(style, detail, custom),
        outcome=outcome,
    )
    return cls().render(request)


def _halves() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """70% of the positive evidence on the 'dog' (left half), 30% on the 'ball' (top right quarter), a negative corner."""
    saliency = np.zeros((10, 10), np.float32)
    saliency[:, :5] = 0.7 / 50
    saliency[:5, 5:] = 0.3 / 25
    saliency[9, 9] = -1.0
    dog = np.zeros((10, 10), bool)
    dog[:, :5] = True
    ball = np.zeros((10, 10), bool)
    ball[:5, 5:] = True
    return saliency, {"dog": dog, "ball": ball}


def _shares(saliency: np.ndarray, regions: dict[str, np.ndarray], sign: str) -> dict[str, float]:
    part = np.maximum(saliency if sign == "positive" else -saliency, 0).astype(np.float64)
    shares = {name: float(part[mask].sum() / part.sum()) for name, mask in regions.items()}
    shares["(outside)"] = float(part[~np.any(list(regions.values()), axis=0)].sum() / part.sum())
    return shares


def test_named_regions_seventy_thirty() -> None:
    saliency, regions = _halves()
    result = _render("named_regions", saliency, regions)
    assert result.text == "70% of the positive evidence lies in 'dog'; 'ball' adds 30%; 0% lies outside the named regions."
    shares = _shares(saliency, regions, "positive")
    first = FIRST.search(result.text)
    assert first is not None
    claims = [(first.group(3), int(first.group(1)))] + [(n, int(p)) for n, p in MORE.findall(result.text)]
    for name, stated in claims:
        assert abs(stated - 100 * shares[name]) <= 0.5
    assert [(f.kind, f.region) for f in result.facts] == [("region", "dog"), ("region", "ball"), ("outside", "")]
    assert [f.share for f in result.facts] == pytest.approx([0.7, 0.3, 0.0])


def test_named_regions_negative_and_outside() -> None:
    saliency, regions = _halves()
    result = _render("named_regions", saliency, regions, label="dog", probability=0.8, sign="negative")
    # The negative corner lies in neither region: all of it is outside.
    assert result.text == "The model predicts 'dog' (0.80). None of the negative evidence (against 'dog') lies in a named region."
    assert [(f.kind, f.sign, f.share) for f in result.facts if f.kind != "prediction"] == [("outside", "negative", 1.0)]
    regions["corner"] = np.zeros((10, 10), bool)
    regions["corner"][5:, 5:] = True
    both = _render("named_regions", saliency, regions, sign="both")
    assert "100% of the negative evidence lies in 'corner'" in both.text
    assert OUTSIDE.findall(both.text) == ["0", "0"]


def test_masks_of_another_size_are_resized_by_the_engine_not_here() -> None:
    saliency, regions = _halves()
    with pytest.raises(InvalidArgument) as raised:
        _render("named_regions", saliency, {"dog": np.ones((4, 4), bool)})
    assert raised.value.reason == "REGION_SHAPE_MISMATCH"
    with pytest.raises(InvalidArgument) as raised:
        _render("named_regions", saliency)
    assert raised.value.reason == "REGIONS_REQUIRED"


def test_correctness_and_confidence_lines() -> None:
    saliency, _ = _halves()
    right = _render("grid_regions", saliency, label="dog", probability=0.8, outcome=Outcome("dog", 0.8, true_label="dog"))
    assert right.text.startswith("The model predicts 'dog' (0.80). The prediction is correct: the true class is 'dog'. ")
    assert [(f.kind, f.region, f.value) for f in right.facts[:2]] == [("prediction", "dog", 0.8), ("correctness", "dog", 1.0)]
    wrong = _render("grid_regions", saliency, label="dog", probability=0.8, outcome=Outcome("dog", 0.8, true_label="cat"))
    assert "The prediction is wrong: the true class is 'cat', not 'dog'." in wrong.text
    assert wrong.facts[1].value == 0.0
    other = _render("grid_regions", saliency, label="cat", probability=0.15, outcome=Outcome("dog", 0.8))
    assert other.text.startswith("The model predicts 'dog' (0.80); the map explains 'cat' (0.15).")
    assert [(f.region, f.rank, f.value) for f in other.facts[:2]] == [("dog", 0, 0.8), ("cat", 1, 0.15)]


@pytest.mark.parametrize("template", ["grid_regions", "components", "named_regions"])
def test_contrast_says_why_the_target_rather_than_the_foil(template: str) -> None:
    saliency, regions = _halves()
    outcome = Outcome("dog", 0.8, foil="cat", foil_probability=0.05)
    result = _render(template, saliency, regions, label="dog", probability=0.8, outcome=outcome)
    contrast = result.facts[-1]
    top = next(f for f in result.facts if f.sign == "positive" and f.kind in ("region", "component"))
    assert (contrast.kind, contrast.region, contrast.share, contrast.value) == ("contrast", top.region, top.share, 0.05)
    match = re.search(
        r"rather than 'cat' \((\d\.\d\d)\) mainly because of (.+), which holds (\d+)% of the evidence for 'dog' over 'cat'\.$", result.text
    )
    assert match is not None, result.text
    assert float(match.group(1)) == 0.05 and int(match.group(3)) == round(100 * top.share)
    assert "evidence for 'dog' over 'cat' lies in" in result.text or template == "components"


def test_every_style_gives_every_key_and_renders_every_form() -> None:
    styles = load_styles()
    assert {"plain", "terse"} <= set(styles)
    keys = schema()
    saliency, regions = _halves()
    for name, style in styles.items():
        assert set(keys) <= set(style.texts), name
        for template in ("grid_regions", "components", "named_regions"):
            result = _render(template, saliency, regions, label="dog", probability=0.8, style=name, sign="both")
            assert result.text and "{" not in result.text


def test_terse_style_keeps_the_numbers() -> None:
    saliency, regions = _halves()
    plain = _render("named_regions", saliency, regions)
    terse = _render("named_regions", saliency, regions, style="terse")
    assert terse.text == "evidence: dog 70%; ball 30%; outside 0%."
    assert [f.share for f in terse.facts] == [f.share for f in plain.facts]


def test_custom_templates_replace_texts_and_are_validated() -> None:
    saliency, regions = _halves()
    custom = {"named_regions.first": "Mostly {region}: {percent} percent", "named_regions.more": "{region} {percent} percent"}
    result = _render("named_regions", saliency, regions, custom=custom)
    assert result.text == "Mostly dog: 70 percent; ball 30 percent; 0% lies outside the named regions."
    with pytest.raises(InvalidArgument) as raised:
        phrases_for(custom={"named_regions.first": "{percentage} in {region}"})
    assert raised.value.reason == "UNKNOWN_PLACEHOLDER" and raised.value.metadata["placeholder"] == "percentage"
    assert "{percentage}" in raised.value.message and "{percent}" in raised.value.message
    for bad, reason in [
        ({"named_regions.firts": "x"}, "UNKNOWN_TEMPLATE_KEY"),
        ({"named_regions.first@long": "x"}, "UNKNOWN_TEMPLATE_KEY"),
        ({"named_regions.first": "{region.__class__}"}, "INVALID_PLACEHOLDER"),
        ({"named_regions.first": "{percent:>9}"}, "INVALID_PLACEHOLDER"),
        ({"named_regions.first": "unclosed {"}, "INVALID_TEMPLATE_TEXT"),
    ]:
        with pytest.raises(InvalidArgument) as raised:
            phrases_for(custom=bad)
        assert raised.value.reason == reason, bad


def test_unknown_style_and_detail() -> None:
    with pytest.raises(NotFound) as missing:
        phrases_for("poetic")
    assert missing.value.reason == "UNKNOWN_STYLE" and "plain" in missing.value.message and "terse" in missing.value.message
    with pytest.raises(InvalidArgument) as bad:
        phrases_for(detail="verbose")
    assert bad.value.reason == "INVALID_DETAIL"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # standard: max_regions (2, 2, 3). detailed: grid names cells with >= 10% (the weakest block has 1/15);
        # components finds the 3 blocks at or above half the maximum; named_regions names every region with evidence.
        ("grid_regions", [1, 2, 4]),
        ("components", [1, 2, 3]),
        ("named_regions", [1, 3, 5]),
    ],
)
def test_detail_changes_how_many_regions_are_said(template: str, expected: list[int]) -> None:
    saliency = np.zeros((9, 9), np.float32)
    for k, (r, c) in enumerate([(0, 0), (0, 3), (3, 3), (6, 6), (6, 0)]):
        saliency[r : r + 2, c : c + 2] = 5 - k  # five separate blocks, in five cells
    regions = {f"r{k}": np.pad(np.ones((3, 3), bool), ((3 * (k // 3), 6 - 3 * (k // 3)), (3 * (k % 3), 6 - 3 * (k % 3)))) for k in range(9)}
    counts = [
        len([f for f in _render(template, saliency, regions, detail=d).facts if f.kind in ("region", "component")])
        for d in ("short", "standard", "detailed")
    ]
    assert counts == expected
