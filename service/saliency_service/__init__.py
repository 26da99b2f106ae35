"""saliency-service: explain, score and verbalize vision models over gRPC."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DynamicBatching", "export_model"]

if TYPE_CHECKING:
    from saliency_service.core.models.config import DynamicBatching
    from saliency_service.core.models.export import export_model


def __getattr__(name: str) -> Any:
    # Lazy, so `import saliency_service` (e.g. for the CLI's --help) does not load torch.
    if name == "export_model":
        from saliency_service.core.models.export import export_model

        return export_model
    if name == "DynamicBatching":
        from saliency_service.core.models.config import DynamicBatching

        return DynamicBatching
    raise AttributeError(name)
