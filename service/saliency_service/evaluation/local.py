"""The in-process scorer: the Engine over a model repository, as `saliency-service serve` would run it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from saliency_service.core.engine import Engine, ExplainJob, ScoreJob
from saliency_service.core.errors import FailedPrecondition, InvalidArgument
from saliency_service.core.methods import METHODS
from saliency_service.core.metrics import METRICS
from saliency_service.core.types import RawTensor
from saliency_service.evaluation.run import CannotRun, Catalog, ProgressFn


def _raw(array: np.ndarray) -> RawTensor:
    array = np.ascontiguousarray(array)
    return RawTensor(str(array.dtype), array.shape, array.tobytes())


class EngineScorer:
    """Score and Explain through an Engine; refusals (InvalidArgument, FailedPrecondition) become CannotRun."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def catalog(self) -> Catalog:
        return Catalog(
            methods={name: frozenset(p.name for p in METHODS.get(name).params) for name in METHODS.names()},
            metrics={name: METRICS.get(name).higher_is_better for name in METRICS.names()},
            labels={s.name: s.config.labels for s in self.engine.repository.statuses() if s.model is not None and s.config is not None},
        )

    def score(
        self,
        model: str,
        images: np.ndarray,
        method: str,
        metric: str,
        *,
        method_params: Mapping[str, Any],
        metric_params: Mapping[str, Any],
        masks: np.ndarray | None,
        seed: int,
        progress: ProgressFn,
        saliency: np.ndarray | None = None,
    ) -> list[float]:
        job = ScoreJob(
            model=model,
            images=[_raw(image) for image in images],
            metric=metric,
            metric_params=metric_params,
            method="" if saliency is not None else method,
            method_params={} if saliency is not None else method_params,
            saliency=[] if saliency is None else [_raw(m.astype(np.float32)) for m in saliency],
            seed=seed,
            masks=[] if masks is None else [_raw(mask.astype(np.uint8)) for mask in masks],
        )
        try:
            return [result.value for result in self.engine.score(job, progress)]
        except (InvalidArgument, FailedPrecondition) as error:
            raise CannotRun(error.reason, error.message) from None

    def explain(self, model: str, images: np.ndarray, method: str, *, method_params: Mapping[str, Any], seed: int) -> list[np.ndarray]:
        job = ExplainJob(model=model, images=[_raw(image) for image in images], method=method, params=method_params, seed=seed)
        try:
            return [explanation.saliency for explanation in self.engine.explain(job)]
        except (InvalidArgument, FailedPrecondition) as error:
            raise CannotRun(error.reason, error.message) from None
