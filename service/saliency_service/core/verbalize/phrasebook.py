"""Styles: the sentence templates as data, one JSON file per style in `styles/`, loaded at start.

A style file is {"description": ..., "templates": {key: text}}. It must give every key the framing
lines (`FRAME_TEXTS`) and the registered forms (`Template.texts`) use; a key may also have a variant
per level of detail, `key@short` or `key@detailed`. A caller's `custom_templates` replace texts of
the chosen style and are validated the same way: unknown keys and unknown placeholders are refused.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass

from saliency_service.core.errors import InvalidArgument, NotFound
from saliency_service.core.verbalize.base import DEFAULT_STYLE, FRAME_TEXTS, STYLE_DIR, TEMPLATES
from saliency_service.core.verbalize.phrases import DEFAULT_DETAIL, DETAILS, Phrases, base_key, check_text

MAX_CUSTOM_TEXT = 2000
"""Longest custom template text, in characters."""


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    texts: Mapping[str, str]


def schema() -> dict[str, frozenset[str]]:
    """Every text key with the placeholders it offers: the framing lines' and each registered form's."""
    keys = dict(FRAME_TEXTS)
    for cls in TEMPLATES:
        keys.update(cls.texts)
    return keys


def check_entry(key: str, text: object, keys: Mapping[str, frozenset[str]]) -> None:
    """InvalidArgument unless `key` (optionally `key@detail`) is known and `text` uses only its placeholders."""
    name, detail = base_key(key)
    if name not in keys or (detail is not None and detail not in DETAILS):
        namespace = name.split(".")[0]
        related = sorted(k for k in keys if k.split(".")[0] == namespace) or sorted(keys)
        raise InvalidArgument(
            "UNKNOWN_TEMPLATE_KEY",
            f"unknown template key '{key}'; keys are 'name' or 'name@level' (level: {', '.join(DETAILS)}), such as: {', '.join(related)}",
            {"key": key},
        )
    if not isinstance(text, str):
        raise InvalidArgument("INVALID_TEMPLATE_TEXT", f"template '{key}' must be a string", {"key": key})
    check_text(key, text, keys[name])


@functools.cache
def load_styles() -> Mapping[str, Style]:
    """Every style file, validated against the schema (a broken file stops the server at start)."""
    keys = schema()
    styles = {}
    for path in sorted(STYLE_DIR.glob("*.json")):
        with path.open(encoding="utf-8") as file:
            data = json.load(file)
        texts = data["templates"]
        for key, text in texts.items():
            check_entry(key, text, keys)
        missing = sorted(set(keys) - set(texts))
        if missing:
            raise ValueError(f"style '{path.stem}' ({path}) has no text for: {', '.join(missing)}")
        styles[path.stem] = Style(path.stem, str(data.get("description", "")), texts)
    if DEFAULT_STYLE not in styles:
        raise ValueError(f"the default style '{DEFAULT_STYLE}' is missing from {STYLE_DIR}")
    return styles


def phrases_for(style: str = "", detail: str = "", custom: Mapping[str, str] | None = None) -> Phrases:
    """The texts a request speaks with: its style (default 'plain'), with its custom texts, at its level of detail."""
    styles = load_styles()
    name = style or DEFAULT_STYLE
    if name not in styles:
        raise NotFound("UNKNOWN_STYLE", f"unknown style '{name}'; available: {', '.join(sorted(styles))}", {"style": name})
    level = detail or DEFAULT_DETAIL
    if level not in DETAILS:
        raise InvalidArgument("INVALID_DETAIL", f"detail '{level}' is not one of: {', '.join(DETAILS)}", {"detail": level})
    texts = dict(styles[name].texts)
    if custom:
        keys = schema()
        for key, text in sorted(custom.items()):
            check_entry(key, text, keys)
            if len(text) > MAX_CUSTOM_TEXT:
                raise InvalidArgument(
                    "TEMPLATE_TEXT_TOO_LONG", f"template '{key}' has {len(text)} characters; at most {MAX_CUSTOM_TEXT}", {"key": key}
                )
            if base_key(key)[1] is None:
                # A caller's text for a key replaces the style's level variants of it too: the caller's words win.
                for level_name in DETAILS:
                    texts.pop(f"{key}@{level_name}", None)
            texts[key] = text
    return Phrases(name, texts, level)
