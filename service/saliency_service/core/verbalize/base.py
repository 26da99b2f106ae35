"""The verbalization-template contract: one class per form, registered under its wire id.

A form describes where the evidence lies (`describe`); the base class frames that with the lines
every form shares: the prediction and its probability, whether it matched the true label, and,
for a contrastive map, why the target rather than the foil. Every sentence comes from the
request's style (`Phrases`), every number from the map or the model's output.
"""

from __future__ import annotations

import functools
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from saliency_service.core.params import ParamSpec, ParamValue
from saliency_service.core.registry import Registry
from saliency_service.core.types import Fact, TokenAttributions, Verbalization
from saliency_service.core.verbalize.phrases import DEFAULT_DETAIL, Phrases

SIGNS = ("positive", "negative", "both")
Unit = Literal["map", "tokens"]
STYLE_DIR = Path(__file__).with_name("styles")
DEFAULT_STYLE = "plain"

FRAME_TEXTS: Mapping[str, frozenset[str]] = {
    "prediction": frozenset({"label", "probability"}),
    "prediction.unscored": frozenset({"label"}),
    "prediction.other_target": frozenset({"predicted", "predicted_probability", "label", "probability"}),
    "correct": frozenset({"true_label"}),
    "incorrect": frozenset({"true_label", "predicted"}),
    "contrast": frozenset({"label", "foil", "foil_probability", "where", "percent"}),
    "evidence.positive": frozenset(),
    "evidence.negative": frozenset(),
    "evidence.negative_against": frozenset({"label"}),
    "evidence.contrast": frozenset({"label", "foil"}),
    "none.map": frozenset({"sign"}),
    "none.tokens": frozenset({"sign"}),
    "tokens.none_found": frozenset({"min_coverage", "evidence"}),
}
"""The texts the framing lines use, with the placeholders each offers."""


@functools.cache
def default_phrases() -> Phrases:
    """The default style's texts at the standard level (for renders outside the engine, e.g. tests)."""
    with (STYLE_DIR / f"{DEFAULT_STYLE}.json").open(encoding="utf-8") as file:
        return Phrases(DEFAULT_STYLE, json.load(file)["templates"])


@dataclass(frozen=True)
class Outcome:
    """What the model said about the input, for the framing lines."""

    predicted: str
    predicted_probability: float
    true_label: str | None = None
    """The caller's true class, for the correctness line."""
    foil: str | None = None
    """The contrast class the map was made against."""
    foil_probability: float | None = None


@dataclass(frozen=True)
class VerbalizeInput:
    saliency: np.ndarray | None
    """H x W float32 map (any resolution); None for token forms."""
    label: str | None
    """The explained class's label, when a model is involved."""
    probability: float | None
    params: Mapping[str, ParamValue]
    tokens: TokenAttributions | None = None
    """One text's tokens and attributions, for token forms."""
    regions: tuple[tuple[str, np.ndarray], ...] = ()
    """Caller-named regions: (name, bool mask at the map's resolution)."""
    phrases: Phrases = field(default_factory=default_phrases)
    outcome: Outcome | None = None

    @property
    def detail(self) -> str:
        return self.phrases.detail

    def say(self, key: str, **values: str | int) -> str:
        return self.phrases.say(key, **values)


@dataclass(frozen=True)
class Described:
    """What a form says about the evidence, before the framing lines."""

    sentences: tuple[str, ...]
    facts: tuple[Fact, ...]
    focus: str = ""
    """How the text names its strongest positive unit ("the centre region"); empty when there is none."""
    focus_percent: str = ""
    """That unit's share, formatted as the form formats shares."""


class Template(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    unit: ClassVar[Unit] = "map"
    """What the form reads: an image map, or token attributions."""
    uses_regions: ClassVar[bool] = False
    """Whether the form reads the caller's named regions (and needs them)."""
    texts: ClassVar[Mapping[str, frozenset[str]]] = {}
    """The style keys this form uses (prefixed with its id), with the placeholders each offers."""

    @abstractmethod
    def describe(self, request: VerbalizeInput) -> Described:
        """Sentences and facts about where the evidence lies; every number computed from the input."""

    def render(self, request: VerbalizeInput) -> Verbalization:
        """The framed text plus the facts that filled it, in the order the text states them."""
        sentences, facts = _opening(request)
        described = self.describe(request)
        sentences += described.sentences
        facts += described.facts
        outcome = request.outcome
        if outcome is not None and outcome.foil is not None and described.focus and request.label is not None:
            top = next(f for f in described.facts if f.sign == "positive")
            foil_probability = outcome.foil_probability if outcome.foil_probability is not None else math.nan
            sentences.append(
                request.say(
                    "contrast",
                    label=request.label,
                    foil=outcome.foil,
                    foil_probability=f"{foil_probability:.2f}",
                    where=described.focus,
                    percent=described.focus_percent,
                )
            )
            facts.append(Fact(region=top.region, share=top.share, sign="positive", rank=0, kind="contrast", value=foil_probability))
        return Verbalization(text=" ".join(sentences), facts=tuple(facts), template=self.name)


def _opening(request: VerbalizeInput) -> tuple[list[str], list[Fact]]:
    """The prediction line (and the correctness line when the true label is known)."""
    label, probability, outcome = request.label, request.probability, request.outcome
    if label is None:
        return [], []
    if probability is None:
        return [request.say("prediction.unscored", label=label)], [Fact(region=label, share=0.0, sign="", rank=0, kind="prediction")]
    if outcome is None or outcome.predicted == label:
        sentences = [request.say("prediction", label=label, probability=f"{probability:.2f}")]
        facts = [Fact(region=label, share=0.0, sign="", rank=0, kind="prediction", value=probability)]
    else:
        # An explicit target that is not the prediction: say both, so the map is not read as the prediction's.
        sentences = [
            request.say(
                "prediction.other_target",
                predicted=outcome.predicted,
                predicted_probability=f"{outcome.predicted_probability:.2f}",
                label=label,
                probability=f"{probability:.2f}",
            )
        ]
        facts = [
            Fact(region=outcome.predicted, share=0.0, sign="", rank=0, kind="prediction", value=outcome.predicted_probability),
            Fact(region=label, share=0.0, sign="", rank=1, kind="prediction", value=probability),
        ]
    if outcome is not None and outcome.true_label is not None:
        correct = outcome.predicted == outcome.true_label
        if correct:
            sentences.append(request.say("correct", true_label=outcome.true_label))
        else:
            sentences.append(request.say("incorrect", true_label=outcome.true_label, predicted=outcome.predicted))
        facts.append(Fact(region=outcome.true_label, share=0.0, sign="", rank=0, kind="correctness", value=1.0 if correct else 0.0))
    return sentences, facts


def sign_param(what: str) -> ParamSpec:
    """The `sign` parameter every form shares."""
    return ParamSpec(
        "sign",
        "string",
        "positive",
        f"Which evidence to describe: positive (for the class), negative (against it), or both, positive first; {what}.",
        choices=SIGNS,
    )


def signs(request: VerbalizeInput) -> tuple[str, ...]:
    """The signs a request asks for, positive first."""
    sign = str(request.params["sign"])
    return ("positive", "negative") if sign == "both" else (sign,)


def evidence_noun(request: VerbalizeInput, sign: str) -> str:
    """'positive evidence', "evidence for 'star' over 'circle'" (contrastive maps), 'negative evidence (against ...)'."""
    outcome = request.outcome
    if sign == "positive":
        if outcome is not None and outcome.foil is not None and request.label is not None:
            return request.say("evidence.contrast", label=request.label, foil=outcome.foil)
        return request.say("evidence.positive")
    if request.label is not None:
        return request.say("evidence.negative_against", label=request.label)
    return request.say("evidence.negative")


def how_many(request: VerbalizeInput, standard: int, detailed: int | None = None) -> int | None:
    """How many units a form names at the request's detail: 1 (short), `standard`, or `detailed` (None: all it found)."""
    return {"short": 1, DEFAULT_DETAIL: standard}.get(request.detail, detailed)


def percent(share: float) -> int:
    """Share as a whole percentage, halves rounded up (not Python's half-to-even)."""
    return math.floor(100 * share + 0.5)


TEMPLATES: Registry[type[Template]] = Registry("template")
