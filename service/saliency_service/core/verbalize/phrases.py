"""Sentence templates with {placeholders}: parsing, validation and filling.

A template text is a `str.format` string whose fields are bare names ("{percent}"), with no
attribute or index access, conversion or format spec: the numbers are formatted by the form that
computed them, so a style changes the words, never the numbers.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass

from saliency_service.core.errors import InvalidArgument

DETAILS = ("short", "standard", "detailed")
"""Levels of detail; a text key may have a variant per level, written `key@level`."""
DEFAULT_DETAIL = "standard"


def placeholders(key: str, text: str) -> set[str]:
    """The placeholder names in `text`, or InvalidArgument when it is not a plain template."""
    names = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as error:
        raise InvalidArgument(
            "INVALID_TEMPLATE_TEXT", f"template '{key}': {error} (write a literal brace as '{{{{' or '}}}}')", {"key": key}
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise InvalidArgument(
                "INVALID_PLACEHOLDER",
                f"template '{key}': placeholder {field} must be a bare name such as {{percent}} (no index, attribute, conversion or spec)",
                {"key": key, "placeholder": name},
            )
        names.add(name)
    return names


def check_text(key: str, text: str, allowed: frozenset[str]) -> None:
    """InvalidArgument naming the first placeholder of `text` that key `key` does not offer."""
    unknown = sorted(placeholders(key, text) - allowed)
    if unknown:
        raise InvalidArgument(
            "UNKNOWN_PLACEHOLDER",
            f"template '{key}': unknown placeholder {{{unknown[0]}}}; this key offers: "
            + (", ".join("{" + name + "}" for name in sorted(allowed)) or "none"),
            {"key": key, "placeholder": unknown[0]},
        )


def base_key(key: str) -> tuple[str, str | None]:
    """'grid_regions.first@short' -> ('grid_regions.first', 'short'); no suffix -> (key, None)."""
    name, at, detail = key.partition("@")
    return (name, detail) if at else (name, None)


@dataclass(frozen=True)
class Phrases:
    """One style's texts (with the caller's overrides) at one level of detail."""

    style: str
    texts: Mapping[str, str]
    detail: str = DEFAULT_DETAIL

    def say(self, key: str, **values: str | int) -> str:
        """The text for `key` (its variant for this detail level when the style has one), filled."""
        text = self.texts.get(f"{key}@{self.detail}", self.texts[key])
        return text.format_map({name: str(value) for name, value in values.items()})
