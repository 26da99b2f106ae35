"""Score metrics. Importing this package imports every module in it, which registers each metric in METRICS."""

import importlib
import pkgutil

from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METRICS", "MetricInput", "MetricValue", "ScoreMetric"]
