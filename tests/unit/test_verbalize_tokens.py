"""SMV's token forms: every percentage and snippet in the text is parsed back and checked against values
recomputed here, from hand-made attributions with known answers and from a slow reference search
written from METRICS.md §10 (filters enumerated as bit patterns, windows by plain loops)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.params import resolve_params
from saliency_service.core.types import TokenAttributions, Verbalization
from saliency_service.core.verbalize import TEMPLATES, VerbalizeInput
from saliency_service.core.verbalize.phrasebook import phrases_for

FORMS = ["token_order", "token_spans", "token_convolution", "token_compare", "token_summary"]
VERBS = "with|contains|occurs in all searches and accounts for"
ITEM = re.compile(rf"(?:token|snippet) '([^']+)' (?:{VERBS}) (\d+\.\d\d)% of the (positive|negative) evidence")
PREDICATES = "is most important for the prediction|is also salient|speaks most against the prediction|also speaks against it"
SUMMARY = re.compile(rf"The (word|phrase|span) » (.+?) « ({PREDICATES}) \((\d+\.\d\d)%\)")


def _render(form: str, tokens: list[str], attributions: list[float], detail: str = "", **params: object) -> Verbalization:
    cls = TEMPLATES.get(form)
    resolved = resolve_params(cls.params, params, form)
    text = TokenAttributions(tuple(tokens), tuple(attributions))
    return cls().render(VerbalizeInput(None, None, None, resolved, tokens=text, phrases=phrases_for(detail=detail)))


def _claims(result: Verbalization) -> list[tuple[str, float, str]]:
    """(snippet, percentage, sign) for every statement, in text order."""
    if result.template == "token_summary":
        found = SUMMARY.findall(result.text)
        return [(snippet, float(p), "negative" if "against" in predicate else "positive") for _, snippet, predicate, p in found]
    return [(snippet, float(p), sign) for snippet, p, sign in ITEM.findall(result.text)]


def _coverage(indices: list[int], values: np.ndarray) -> float:
    return max(0.0, sum(values[i] for i in indices) / sum(max(v, 0.0) for v in values))


def _text(tokens: list[str], indices: list[int]) -> str:
    out = tokens[indices[0]]
    for a, b in zip(indices, indices[1:], strict=False):
        out += (" ... " if b > a + 1 else " ") + tokens[b]
    return out


def _reference_search(values: np.ndarray, length: int, spans: bool) -> dict[tuple[int, ...], float]:
    """Index set -> best window score, by enumerating every bit pattern of `length` slots."""
    scaled = values / abs(values.max())
    top = sorted(scaled, reverse=True)[: max(1, int(0.4 * len(scaled)))]
    theta = sum(top) / len(top)
    patterns = []
    for bits in range(2**length):
        ones = [j for j in range(length) if bits >> j & 1]
        if spans:
            run = len(ones)
            if run >= 3 and run % 2 == 1 and ones == list(range((length - run) // 2, (length - run) // 2 + run)):
                patterns.append(ones)
        elif 2 <= len(ones) <= length - 2:
            patterns.append(ones)
    best: dict[tuple[int, ...], float] = {}
    for start in range(len(values) - length + 1):
        for ones in patterns:
            under = [scaled[start + j] for j in ones]
            score = sum(under) / len(under)
            if min(under) >= 0 and score > theta:
                key = tuple(start + j for j in ones)
                best[key] = max(best.get(key, -1e9), score)
    return best


def _check_numbers(result: Verbalization, tokens: list[str], values: np.ndarray) -> None:
    """Every stated percentage is the coverage of the stated snippet, and the facts match the text."""
    claims = _claims(result)
    evidence = [f for f in result.facts if f.kind in ("token", "span")]
    assert claims and len(claims) == len(evidence), result.text
    for (snippet, percent, sign), fact in zip(claims, evidence, strict=True):
        signed = values if sign == "positive" else -values
        indices = [i for i in range(fact.start, fact.end) if _text(tokens, [i]) in snippet.split(" ")]
        assert fact.region == snippet and fact.sign == sign
        assert snippet == _text(tokens, sorted({*indices}))
        assert abs(percent - 100 * _coverage(indices, signed)) <= 0.005 + 1e-9, (snippet, percent)
        assert fact.share == pytest.approx(_coverage(indices, signed), abs=1e-12)


# --- hand-made inputs with known answers -----------------------------------------------------------

TOKENS = "a b c d e f g h i j".split()


def test_all_mass_on_one_token() -> None:
    values = [0.0] * 10
    values[4] = 2.0
    for form in FORMS:
        result = _render(form, TOKENS, values)
        claims = _claims(result)
        assert claims[0][0].split(" ")[0] in {"e", "d", "c"} or "e" in claims[0][0], (form, result.text)
        if form == "token_order":
            assert result.text == "Top tokens: token 'e' with 100.00% of the positive evidence."
        if form == "token_summary":
            assert result.text == "The word » e « is most important for the prediction (100.00%)."
        assert claims[0][1] == 100.00, result.text


def test_a_seventy_thirty_split_between_two_tokens() -> None:
    values = [0.0] * 10
    values[1], values[7] = 0.3, 0.7
    result = _render("token_order", TOKENS, values)
    assert result.text == ("Top tokens: token 'h' with 70.00% of the positive evidence; token 'b' with 30.00% of the positive evidence.")
    assert [(f.kind, f.region, f.start, f.end, f.rank) for f in result.facts] == [("token", "h", 7, 8, 0), ("token", "b", 1, 2, 1)]
    assert [f.share for f in result.facts] == pytest.approx([0.7, 0.3])
    summary = _render("token_summary", TOKENS, values)
    assert summary.text.startswith("The word » h « is most important for the prediction (70.00%).")


def test_a_negative_token_is_evidence_against() -> None:
    values = [0.1] * 10
    values[3] = -0.5
    positive = _render("token_order", TOKENS, values, top_k=10)
    assert "'d'" not in positive.text  # never a share of the positive evidence
    negative = _render("token_order", TOKENS, values, sign="negative")
    assert negative.text == "Top tokens: token 'd' with 100.00% of the negative evidence."
    summary = _render("token_summary", TOKENS, values, sign="both")
    assert "The word » d « speaks most against the prediction (100.00%)." in summary.text
    assert [f.sign for f in summary.facts][-1] == "negative"


def test_a_contiguous_span_is_found_by_both_searches() -> None:
    # Twenty tokens, so the mean threshold (top 40% = 8 values) is well below the span's score.
    tokens = "the film was not good at all sadly".split() + ["pad"] * 12
    values = [0.0, 0.0, 0.05, 0.9, 0.8, 0.85] + [0.0] * 14
    spans = _render("token_spans", tokens, values)
    claims = _claims(spans)
    assert claims[0][0] == "not good at", spans.text
    assert claims[0][1] == round(100 * (0.9 + 0.8 + 0.85) / 2.6, 2)
    assert (spans.facts[0].kind, spans.facts[0].start, spans.facts[0].end) == ("span", 3, 6)
    compare = _render("token_compare", tokens, values)
    assert _claims(compare)[0][0] == "not good at"
    summary = _render("token_summary", tokens, values)
    # 'was' (0.05) is among the top five single tokens, so the merged phrase starts there and holds everything.
    assert summary.text == "The phrase » was not good at « is most important for the prediction (100.00%)."


def test_gapped_snippets_show_the_gap() -> None:
    tokens = "not really very good".split() + ["x"] * 16
    values = [0.9, 0.0, 0.0, 0.8] + [0.0] * 16
    result = _render("token_convolution", tokens, values)
    assert _claims(result)[0][0] == "not ... good", result.text
    assert (result.facts[0].start, result.facts[0].end) == (0, 4)


# --- random inputs against the slow reference --------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("form", FORMS)
def test_every_number_matches_the_attributions(seed: int, form: str) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 30))
    tokens = [f"w{i}" for i in range(n)]
    values = np.round(rng.standard_normal(n) + 0.3, 3)
    searches = {"min_coverage": 0.0} if form in ("token_spans", "token_convolution", "token_compare") else {}
    result = _render(form, tokens, values.tolist(), sign="both", **searches)
    if not any(f.kind in ("token", "span") for f in result.facts):
        assert "No snippet" in result.text
        return
    _check_numbers(result, tokens, values)


@pytest.mark.parametrize("seed", range(6))
def test_the_searches_find_what_the_reference_finds(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = 20
    tokens = [f"w{i}" for i in range(n)]
    values = np.round(np.abs(rng.standard_normal(n)) * (rng.random(n) > 0.3), 3)
    for form, spans in (("token_spans", True), ("token_convolution", False)):
        result = _render(form, tokens, values.tolist(), min_coverage=0.0, top_k=100)
        reference = _reference_search(values, 5, spans)
        ranked = sorted(reference.items(), key=lambda item: (-item[1], item[0]))
        assert len(result.facts) == len(reference)
        assert spans or reference, "the convolution search finds pairs in every seed"
        assert [f.value for f in result.facts] == pytest.approx([score for _, score in ranked])
        for fact, (indices, _) in zip(result.facts, ranked, strict=True):
            assert fact.region == _text(tokens, list(indices))
            assert fact.share == pytest.approx(_coverage(list(indices), values))
    compare = _render("token_compare", tokens, values.tolist(), min_coverage=0.0, top_k=100)
    both = set(_reference_search(values, 5, True)) & set(_reference_search(values, 5, False))
    assert sorted(f.region for f in compare.facts) == sorted(_text(tokens, list(i)) for i in both)


def test_detail_changes_how_many_are_said() -> None:
    values = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01, 0.01, 0.01]
    tokens = [f"t{i}" for i in range(len(values))]
    counts = [len(_render("token_order", tokens, values, detail=d).facts) for d in ("short", "standard", "detailed")]
    assert counts == [1, 5, 10]


def test_max_words_refuses_long_texts() -> None:
    with pytest.raises(InvalidArgument) as raised:
        _render("token_summary", ["w"] * 101, [1.0] * 101)
    assert raised.value.reason == "TOO_MANY_TOKENS"
    assert _render("token_summary", ["w"] * 101, [1.0] * 101, max_words=200).facts


def test_no_evidence_and_no_snippet() -> None:
    assert _render("token_order", TOKENS, [-1.0] * 10).text == "The attributions hold no positive evidence."
    flat = _render("token_spans", TOKENS, [1.0] * 10)  # every window scores θ, none above it
    assert flat.text == "No snippet holds more than 10.00% of the positive evidence." and flat.facts == ()


@pytest.mark.parametrize(
    ("tokens", "attributions", "reason"),
    [(["a", "b"], [1.0], "TOKEN_COUNT_MISMATCH"), ([], [], "NO_TOKENS"), (["a"], [float("nan")], "NON_FINITE_ATTRIBUTIONS")],
)
def test_bad_tokens(tokens: list[str], attributions: list[float], reason: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        _render("token_order", tokens, attributions)
    assert raised.value.reason == reason
