"""Parameter schemas that methods, metrics and templates publish, and their validation.

A `ParamSpec` is the single source of truth for a parameter: ListMethods publishes it, and
`resolve_params` validates a caller's values against it once, at the edge of the core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from saliency_service.core.errors import InvalidArgument, NotFound

ParamType = Literal["int", "float", "bool", "string"]
ParamValue = int | float | bool | str


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its type, default, allowed range or choices, and what it does."""

    name: str
    type: ParamType
    default: ParamValue
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def validate(self, value: object, owner: str) -> ParamValue:
        """Return `value` coerced to this parameter's type, or raise InvalidArgument."""
        meta = {"parameter": self.name, "owner": owner}
        if self.type == "bool":
            if not isinstance(value, bool):
                raise InvalidArgument("INVALID_PARAMETER", f"{owner}: parameter '{self.name}' must be a boolean, got {value!r}", meta)
            return value
        if self.type == "string":
            if not isinstance(value, str):
                raise InvalidArgument("INVALID_PARAMETER", f"{owner}: parameter '{self.name}' must be a string, got {value!r}", meta)
            if self.choices and value not in self.choices:
                raise InvalidArgument(
                    "INVALID_PARAMETER",
                    f"{owner}: parameter '{self.name}' must be one of {', '.join(self.choices)}; got '{value}'",
                    meta,
                )
            return value
        # Numbers: the wire carries doubles, so an int parameter accepts an integral float.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument("INVALID_PARAMETER", f"{owner}: parameter '{self.name}' must be a number, got {value!r}", meta)
        if not math.isfinite(value):
            raise InvalidArgument("INVALID_PARAMETER", f"{owner}: parameter '{self.name}' must be finite, got {value}", meta)
        number: int | float
        if self.type == "int":
            if float(value) != int(value):
                raise InvalidArgument("INVALID_PARAMETER", f"{owner}: parameter '{self.name}' must be an integer, got {value}", meta)
            number = int(value)
        else:
            number = float(value)
        if (self.minimum is not None and number < self.minimum) or (self.maximum is not None and number > self.maximum):
            raise InvalidArgument(
                "PARAMETER_OUT_OF_RANGE",
                f"{owner}: parameter '{self.name}' = {number} is outside its allowed range [{_fmt(self.minimum)}, {_fmt(self.maximum)}]",
                {**meta, "minimum": _fmt(self.minimum), "maximum": _fmt(self.maximum)},
            )
        return number


def _fmt(bound: float | None) -> str:
    if bound is None:
        return "unbounded"
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def resolve_params(specs: Sequence[ParamSpec], given: Mapping[str, object] | None, owner: str) -> dict[str, ParamValue]:
    """Validate `given` against `specs` and fill defaults. Unknown names are NOT_FOUND."""
    given = dict(given or {})
    known = {spec.name: spec for spec in specs}
    for name in given:
        if name not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise NotFound(
                "UNKNOWN_PARAMETER",
                f"{owner} has no parameter '{name}' (its parameters: {allowed})",
                {"parameter": name, "owner": owner},
            )
    return {spec.name: spec.validate(given[spec.name], owner) if spec.name in given else spec.default for spec in specs}
