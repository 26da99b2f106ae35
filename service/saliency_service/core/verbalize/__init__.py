"""Verbalization templates. Importing this package imports every module in it, which registers each template in TEMPLATES."""

import importlib
import pkgutil

from saliency_service.core.verbalize.base import TEMPLATES, Template, VerbalizeInput

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TEMPLATES", "Template", "VerbalizeInput"]
