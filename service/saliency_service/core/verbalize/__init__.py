"""Verbalization templates. Importing this package registers every template in TEMPLATES."""

from saliency_service.core.verbalize import components, grid  # noqa: F401  (registration)
from saliency_service.core.verbalize.base import TEMPLATES, Template, VerbalizeInput

__all__ = ["TEMPLATES", "Template", "VerbalizeInput"]
