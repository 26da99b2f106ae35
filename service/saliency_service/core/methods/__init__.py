"""Saliency methods. Importing this package registers every method in METHODS."""

from saliency_service.core.methods import cam, eigen_cam, gradient  # noqa: F401  (registration)
from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod

__all__ = ["METHODS", "MethodInput", "SaliencyMethod"]
