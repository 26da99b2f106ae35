"""The verbalization-template contract: one class per form, registered under its wire id."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from saliency_service.core.params import ParamSpec, ParamValue
from saliency_service.core.registry import Registry
from saliency_service.core.types import Verbalization


@dataclass(frozen=True)
class VerbalizeInput:
    saliency: np.ndarray
    """H x W float32 map (any resolution)."""
    label: str | None
    """The explained class's label, when a model is involved."""
    probability: float | None
    params: Mapping[str, ParamValue]


class Template(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[ParamSpec, ...]] = ()

    @abstractmethod
    def render(self, request: VerbalizeInput) -> Verbalization:
        """Text plus the facts that filled it; every number is computed from the map."""


TEMPLATES: Registry[type[Template]] = Registry("template")
