"""Score metrics. Importing this package registers every metric in METRICS."""

from saliency_service.core.metrics import deletion_insertion  # noqa: F401  (registration)
from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric

__all__ = ["METRICS", "MetricInput", "MetricValue", "ScoreMetric"]
