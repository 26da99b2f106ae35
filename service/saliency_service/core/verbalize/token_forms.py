"""The token forms of Saliency Map Verbalization (Feldhus et al. 2023; METRICS.md §10), model-free:
a text's tokens and one attribution per token in, a templated text out.

- token_order: the top tokens, each with its share of the evidence (SMV's total order).
- token_spans: contiguous snippets the span search finds.
- token_convolution: gapped snippets the convolution search finds.
- token_compare: snippets both searches find.
- token_summary: the searches and the top tokens merged into ranked phrases (SMV's summary).

A snippet's percentage is its coverage: the sum of its attributions over the sum of the positive
attributions (for negative evidence, of the negated attributions), so every number comes from the input.
Shares are stated with two decimals, as in SMV.
"""

from __future__ import annotations

import math

import numpy as np

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.params import ParamSpec
from saliency_service.core.types import Fact, TokenAttributions
from saliency_service.core.verbalize import token_search
from saliency_service.core.verbalize.base import TEMPLATES, Described, Template, VerbalizeInput, evidence_noun, how_many, sign_param, signs
from saliency_service.core.verbalize.token_search import Snippet

SIGN = sign_param("negative evidence is that of the negated attributions")
TOP_K = ParamSpec(
    "top_k", "int", 5, "Most tokens or snippets to state (detail 'short': 1; 'detailed': twice as many).", minimum=1, maximum=100
)
SEARCH_PARAMS = (
    ParamSpec(
        "threshold",
        "string",
        "mean",
        "How the search threshold θ is set on the attributions divided by their maximum: 'mean' of the top `top_fraction` "
        "of them; 'quantile': `k` standard deviations (SMV's name); 'variance': `k` times the variance.",
        choices=token_search.THRESHOLDS,
    ),
    ParamSpec(
        "top_fraction", "float", 0.4, "The 'mean' threshold's share of tokens, v (at least one token is used).", minimum=0.01, maximum=1.0
    ),
    ParamSpec("k", "float", 3.0, "The 'quantile' and 'variance' thresholds' multiplier.", minimum=0.0, maximum=100.0),
    ParamSpec("filter_length", "int", 5, "Search window length L (the convolution search needs at least 4).", minimum=3, maximum=9),
    ParamSpec(
        "max_words",
        "int",
        100,
        "Longest text, in tokens, these searches describe (SMV's filter); longer texts are refused.",
        minimum=1,
        maximum=100_000,
    ),
)
MIN_COVERAGE = ParamSpec(
    "min_coverage",
    "float",
    0.1,
    "Snippets must hold more than this share of the evidence to be stated (SMV's filter).",
    minimum=0.0,
    maximum=1.0,
)


def checked_tokens(tokens: TokenAttributions | None, index: int = 0) -> TokenAttributions:
    """The text's tokens, or InvalidArgument when they are missing, empty, unmatched or not finite."""
    where = {"text_index": index}
    if tokens is None:
        raise InvalidArgument("TOKENS_REQUIRED", "token forms describe token attributions; send `tokens`", where)
    if not tokens.tokens:
        raise InvalidArgument("NO_TOKENS", f"text {index} has no tokens", where)
    if len(tokens.tokens) != len(tokens.attributions):
        raise InvalidArgument(
            "TOKEN_COUNT_MISMATCH",
            f"text {index} has {len(tokens.tokens)} tokens and {len(tokens.attributions)} attributions; send one attribution per token",
            {**where, "tokens": len(tokens.tokens), "attributions": len(tokens.attributions)},
        )
    if not all(math.isfinite(a) for a in tokens.attributions):
        raise InvalidArgument("NON_FINITE_ATTRIBUTIONS", f"text {index} has NaN or infinite attributions", where)
    return tokens


def quoted(tokens: tuple[str, ...], indices: tuple[int, ...]) -> str:
    """The snippet's tokens joined by spaces, '...' where the snippet skips tokens."""
    parts = [tokens[indices[0]]]
    for previous, i in zip(indices, indices[1:], strict=False):
        parts.append(("... " if i > previous + 1 else "") + tokens[i])
    return " ".join(parts)


def share_text(share: float) -> str:
    return f"{100 * share:.2f}"


def fact(snippet: Snippet, tokens: tuple[str, ...], sign: str, rank: int) -> Fact:
    kind = "token" if len(snippet.indices) == 1 else "span"
    text = quoted(tokens, snippet.indices)
    return Fact(text, snippet.coverage, sign, rank, kind, snippet.score, snippet.indices[0], snippet.indices[-1] + 1)


class _TokenForm(Template):
    """What every token form shares: the input check, the per-sign loop and the list sentence."""

    unit = "tokens"

    def snippets(self, request: VerbalizeInput, evidence: np.ndarray) -> list[Snippet]:
        """This sign's snippets, in the order the text states them (before the detail limit)."""
        raise NotImplementedError

    def sentence(self, request: VerbalizeInput, found: list[Fact], noun: str) -> str:
        """The sentence stating `found` (never empty)."""
        items = "; ".join(request.say(f"{self.name}.item", snippet=f.region, percent=share_text(f.share), evidence=noun) for f in found)
        return request.say(f"{self.name}.list", items=items)

    def limit(self, request: VerbalizeInput) -> int | None:
        top_k = int(request.params["top_k"])
        return how_many(request, top_k, 2 * top_k)

    def describe(self, request: VerbalizeInput) -> Described:
        tokens = checked_tokens(request.tokens)
        max_words = request.params.get("max_words")
        if max_words is not None and len(tokens.tokens) > int(max_words):
            raise InvalidArgument(
                "TOO_MANY_TOKENS",
                f"{self.name}: the text has {len(tokens.tokens)} tokens, more than max_words = {max_words}; raise `max_words` "
                "or use token_order",
                {"tokens": len(tokens.tokens), "max_words": max_words},
            )
        values = np.asarray(tokens.attributions, dtype=np.float64)
        sentences: list[str] = []
        facts: list[Fact] = []
        for sign in signs(request):
            evidence = values if sign == "positive" else -values
            noun = evidence_noun(request, sign)
            if evidence.max() <= 0:
                sentences.append(request.say("none.tokens", sign=sign))
                continue
            found = [fact(s, tokens.tokens, sign, rank) for rank, s in enumerate(self.snippets(request, evidence)[: self.limit(request)])]
            if not found:
                floor = float(request.params.get("min_coverage", 0.0))
                sentences.append(request.say("tokens.none_found", min_coverage=share_text(floor), evidence=noun))
                continue
            sentences.append(self.sentence(request, found, noun))
            facts += found
        return Described(tuple(sentences), tuple(facts))


def _searches(request: VerbalizeInput, evidence: np.ndarray) -> tuple[list[Snippet], list[Snippet]]:
    """The span and convolution searches at the request's threshold."""
    length = int(request.params["filter_length"])
    theta = token_search.threshold(
        token_search.normalised(evidence),
        str(request.params["threshold"]),
        float(request.params["top_fraction"]),
        float(request.params["k"]),
    )
    spans = token_search.search(evidence, token_search.span_filters(length), theta)
    convolutions = token_search.search(evidence, token_search.convolution_filters(length), theta)
    return spans, convolutions


def _covering(found: list[Snippet], request: VerbalizeInput) -> list[Snippet]:
    floor = float(request.params["min_coverage"])
    return [s for s in found if s.coverage > floor]


@TEMPLATES.register("token_order")
class TokenOrder(_TokenForm):
    description = "SMV's total order: the tokens with the most evidence, each with its share of it."
    params = (TOP_K, SIGN)
    texts = {
        "token_order.item": frozenset({"snippet", "percent", "evidence"}),
        "token_order.list": frozenset({"items"}),
    }

    def snippets(self, request: VerbalizeInput, evidence: np.ndarray) -> list[Snippet]:
        return token_search.total_order(evidence)


@TEMPLATES.register("token_spans")
class TokenSpans(_TokenForm):
    description = "SMV's span search: contiguous snippets whose mean normalised attribution exceeds the threshold, best first."
    params = (*SEARCH_PARAMS, MIN_COVERAGE, TOP_K, SIGN)
    texts = {
        "token_spans.item": frozenset({"snippet", "percent", "evidence"}),
        "token_spans.list": frozenset({"items"}),
    }

    def snippets(self, request: VerbalizeInput, evidence: np.ndarray) -> list[Snippet]:
        return _covering(_searches(request, evidence)[0], request)


@TEMPLATES.register("token_convolution")
class TokenConvolution(_TokenForm):
    description = "SMV's convolution search: gapped snippets (i of L tokens, 2 <= i <= L-2) above the threshold, best first."
    params = (*SEARCH_PARAMS, MIN_COVERAGE, TOP_K, SIGN)
    texts = {
        "token_convolution.item": frozenset({"snippet", "percent", "evidence"}),
        "token_convolution.list": frozenset({"items"}),
    }

    def snippets(self, request: VerbalizeInput, evidence: np.ndarray) -> list[Snippet]:
        return _covering(_searches(request, evidence)[1], request)


@TEMPLATES.register("token_compare")
class TokenCompare(_TokenForm):
    description = "SMV's compare search: the snippets both the span and the convolution search find, by coverage."
    params = (*SEARCH_PARAMS, MIN_COVERAGE, TOP_K, SIGN)
    texts = {
        "token_compare.item": frozenset({"snippet", "percent", "evidence"}),
        "token_compare.list": frozenset({"items"}),
    }

    def snippets(self, request: VerbalizeInput, evidence: np.ndarray) -> list[Snippet]:
        return _covering(token_search.compare(*_searches(request, evidence)), request)


@TEMPLATES.register("token_summary")
class TokenSummary(_TokenForm):
    description = (
        "SMV's summary: the top snippets of both searches and the top tokens, merged into phrases; those at or above the "
        "75th percentile of coverage are said, most important first (detail 'detailed': every phrase)."
    )
    params = (*SEARCH_PARAMS, TOP_K, SIGN)
    texts = {
        "token_summary.word": frozenset({"snippet"}),
        "token_summary.phrase": frozenset({"snippet"}),
        "token_summary.span": frozenset({"snippet"}),
        "token_summary.first": frozenset({"subject", "percent"}),
        "token_summary.more": frozenset({"subject", "percent"}),
        "token_summary.first_negative": frozenset({"subject", "percent"}),
        "token_summary.more_negative": frozenset({"subject", "percent"}),
    }

    def limit(self, request: VerbalizeInput) -> int | None:
        return 1 if request.detail == "short" else None

    def snippets(self, request: VerbalizeInput, evidence: np.ndarray) -> list[Snippet]:
        spans, convolutions = _searches(request, evidence)
        return token_search.summary(evidence, spans, convolutions, int(request.params["top_k"]), request.detail == "detailed")

    def sentence(self, request: VerbalizeInput, found: list[Fact], noun: str) -> str:
        said = []
        for f in found:
            shape = "word" if f.kind == "token" else "span" if "." in f.region else "phrase"
            subject = request.say(f"token_summary.{shape}", snippet=f.region)
            predicate = ("first" if f.rank == 0 else "more") + ("_negative" if f.sign == "negative" else "")
            said.append(request.say(f"token_summary.{predicate}", subject=subject, percent=share_text(f.share)))
        return " ".join(said)
