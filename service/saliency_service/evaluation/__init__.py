"""`evaluate`: every method against every metric on generated held-out images, written as a table."""

from saliency_service.evaluation.run import LIGHT, CannotRun, Catalog, Evaluation, Plan, Scorer, UnknownIds, evaluate

__all__ = ["LIGHT", "CannotRun", "Catalog", "Evaluation", "Plan", "Scorer", "UnknownIds", "evaluate"]
