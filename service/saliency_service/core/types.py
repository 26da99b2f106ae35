"""Frozen values that cross the core's boundary: what the engine takes and returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from saliency_service.core.params import ParamValue


@dataclass(frozen=True)
class EncodedImage:
    """PNG/JPEG/... bytes as the client sent them."""

    data: bytes


@dataclass(frozen=True)
class RawTensor:
    """A dense little-endian C-order tensor as sent: images are H x W x 3 (uint8, or float32 in [0, 1]);
    saliency maps are H x W float32."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


ImageInput = EncodedImage | RawTensor


@dataclass(frozen=True)
class TokenAttributions:
    """One text's tokens and one attribution per token, for model-free verbalization."""

    tokens: tuple[str, ...]
    attributions: tuple[float, ...]


@dataclass(frozen=True)
class NamedRegion:
    """A caller-named region of an image: its mask (uint8 or float32 H x W, nonzero inside)."""

    name: str
    mask: RawTensor


@dataclass(frozen=True)
class TargetRequest:
    """Which class to explain: None for the predicted class, else an index or a label."""

    class_index: int | None = None
    label: str | None = None


@dataclass(frozen=True)
class Provenance:
    """Where a result came from: enough to reproduce it."""

    model: str
    model_version: str
    method: str
    params: Mapping[str, ParamValue]
    layer: str = ""
    seed: int = 0
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    """Every layer the map was computed at; `layer` is the first."""
    foil: int | None = None
    foil_label: str = ""


@dataclass(frozen=True)
class Explanation:
    """One image's saliency map (H x W float32, the input image's resolution) and its context."""

    saliency: np.ndarray
    target: int
    label: str
    predicted: int
    probabilities: np.ndarray
    provenance: Provenance
    layer_maps: Mapping[str, np.ndarray] = field(default_factory=dict)
    """Per-layer maps (H x W, the image's resolution) when several layers were requested."""


@dataclass(frozen=True)
class ScoreResult:
    """A metric's value for one image, with its curve where the metric has one."""

    metric: str
    value: float
    curve: np.ndarray
    target: int
    label: str
    params: Mapping[str, ParamValue]
    higher_is_better: bool
    provenance: Provenance
    curve_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    components: Mapping[str, float] = field(default_factory=dict)
    maps: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Fact:
    """One statement a verbalization makes, with the number that fills it."""

    region: str
    share: float
    sign: str
    rank: int
    kind: str = "region"
    value: float = 0.0
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class Verbalization:
    text: str
    facts: tuple[Fact, ...]
    template: str
    provenance: Provenance | None = None
