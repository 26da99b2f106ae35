"""Saliency methods. Importing this package imports every module in it, which registers each method in METHODS."""

import importlib
import pkgutil

from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "MethodInput", "SaliencyMethod"]
