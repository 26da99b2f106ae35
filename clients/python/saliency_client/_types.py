"""The values the client returns: frozen dataclasses, decoupled from the generated proto classes.

Arrays come back read-only (they are views of the response bytes); copy one to change it.
Classes holding arrays compare by identity (`eq=False`): element-wise array equality has no
single truth value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

ParameterType = Literal["int", "float", "bool", "string"]
CatalogKind = Literal["method", "metric", "template"]


@dataclass(frozen=True)
class Provenance:
    """Where a result came from: enough to reproduce it."""

    model: str
    model_version: str
    #: Method id, e.g. "grad_cam"; "supplied" when the caller sent the map.
    method: str
    #: The method's parameters after the server filled in defaults.
    params: dict[str, Any]
    #: The layer a CAM method used; "" for input-space methods.
    layer: str
    seed: int
    #: Wall-clock milliseconds per server stage (decode, predict, attribute, ...).
    timings_ms: dict[str, float]
    #: Every layer the map was computed at (several when the request named `layers`).
    layers: tuple[str, ...] = ()
    #: The contrast class when the request named a foil, else None.
    foil: int | None = None
    foil_label: str = ""


@dataclass(frozen=True, eq=False)
class Explanation:
    """One image's saliency map and the prediction it explains."""

    #: float32 height x width, at the input image's resolution.
    saliency: npt.NDArray[np.float32]
    #: Index of the explained class.
    target: int
    #: Label of the explained class.
    label: str
    predicted: int
    predicted_label: str
    #: float32 softmax probabilities over the model's labels.
    probabilities: npt.NDArray[np.float32]
    provenance: Provenance
    #: Per-layer float32 maps when the request named several `layers`, in request order.
    layer_maps: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ScoreResult:
    """How faithful one image's saliency map is, by one metric."""

    metric: str
    value: float
    #: float64 curve where the metric has one (e.g. p(target) after each deletion step); else empty.
    curve: npt.NDArray[np.float64]
    target: int
    label: str
    higher_is_better: bool
    #: The metric's parameters after the server filled in defaults.
    params: dict[str, Any]
    #: Provenance of the scored map.
    provenance: Provenance
    #: The x of each curve point (e.g. the share of pixels removed); empty when there is no curve.
    curve_x: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    #: Named parts of the value where the metric has several (e.g. ROAD's "morf" and "lerf").
    components: dict[str, float] = field(default_factory=dict)
    #: Images the metric returns (float32 height x width), e.g. AggAtt's aggregate maps.
    maps: tuple[npt.NDArray[np.float32], ...] = ()


@dataclass(frozen=True)
class Progress:
    """How far a long Score has come (`SaliencyClient.score(..., progress=callback)`)."""

    #: What is running, e.g. "perturbation passes".
    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class Fact:
    """One statement of a verbalization and the number that fills it."""

    region: str
    #: Share of the attribution of this sign, 0..1.
    share: float
    #: "positive" or "negative".
    sign: str
    #: 0 for the region holding the most evidence.
    rank: int
    #: What the fact is about: "region", "component", "token", "span", "prediction", "correctness", "contrast"
    #: ("" from a server that does not say).
    kind: str = ""
    #: The number stated where it is not a share (e.g. a probability).
    value: float = 0.0
    #: Token facts: the span [start, end) in token positions.
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class Verbalization:
    """A template-made text saying what a saliency map shows, and the facts behind it."""

    text: str
    facts: tuple[Fact, ...]
    template: str
    #: None when the server sent none.
    provenance: Provenance | None


@dataclass(frozen=True)
class InputInfo:
    """What a model expects as input after the server resized the image."""

    height_px: int
    width_px: int
    channels: int
    layout: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class LayerInfo:
    """A layer CAM methods may use."""

    name: str
    #: channels x height x width of its activation.
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """One model of the server's repository."""

    name: str
    version: str
    task: str
    description: str
    labels: tuple[str, ...]
    inputs: InputInfo
    layers: tuple[LayerInfo, ...]
    default_layer: str
    ready: bool
    #: Why the model is not ready; "" when it is.
    reason: str
    #: Where forward passes run: "cpu" or "cuda".
    device: str


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of a method, metric or template."""

    name: str
    type: ParameterType
    default: Any
    #: Inclusive bounds for numbers; None when unbounded.
    minimum: float | None
    maximum: float | None
    #: Allowed values for strings; empty when free.
    choices: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class MethodInfo:
    """A saliency method, a Score metric or a verbalization template."""

    kind: CatalogKind
    name: str
    description: str
    parameters: tuple[ParameterInfo, ...]
    #: Methods only: "cam", "gradient", "perturbation" or "relevance".
    family: str = ""
    #: Methods only: whether the method works at a declared layer.
    uses_layer: bool = False
    #: Methods only: whether the method combines several layers itself.
    multi_layer: bool = False
    #: Methods only: whether a foil (contrast class) is accepted.
    contrastive: bool = False
    #: Methods only: whether the method takes caller-supplied baselines.
    takes_baseline: bool = False
    #: Methods only: whether an input-space method also works at a layer when one is named.
    layer_optional: bool = False
    #: Metrics only; None for methods and templates.
    higher_is_better: bool | None = None


@dataclass(frozen=True)
class MethodCatalog:
    """Everything the server can compute, as listed by ListMethods."""

    methods: tuple[MethodInfo, ...] = field(default=())
    metrics: tuple[MethodInfo, ...] = field(default=())
    templates: tuple[MethodInfo, ...] = field(default=())
    #: Verbalization styles (`verbalize(style=...)`): name -> description.
    styles: dict[str, str] = field(default_factory=dict)

    def get(self, name: str, kind: CatalogKind | None = None) -> MethodInfo:
        """The entry called `name` (of `kind` if given; else methods, then metrics, then templates).

        Raises KeyError when there is none.
        """
        for entry in (*self.methods, *self.metrics, *self.templates):
            if entry.name == name and (kind is None or entry.kind == kind):
                return entry
        raise KeyError(name if kind is None else f"{kind} {name!r}")
