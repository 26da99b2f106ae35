"""The gRPC scorer: a running server through the Python client (`saliency evaluate`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from saliency_client import Progress, SaliencyClient, SaliencyError
from saliency_service.evaluation.run import CannotRun, Catalog, ProgressFn

# The statuses of a request the server refuses as asked (skipped, with the reason); anything else is an error.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


class ClientScorer:
    """Score over ScoreStream (its progress forwarded) and Explain, through a SaliencyClient."""

    def __init__(self, client: SaliencyClient) -> None:
        self.client = client

    def catalog(self) -> Catalog:
        listed = self.client.list_methods()
        return Catalog(
            methods={m.name: frozenset(p.name for p in m.parameters) for m in listed.methods},
            metrics={m.name: bool(m.higher_is_better) for m in listed.metrics},
            labels={m.name: m.labels for m in self.client.list_models() if m.ready},
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
        def forward(event: Progress) -> None:
            progress(event.stage, event.done, event.total)

        try:
            results = self.client.score(
                model,
                list(images),
                method,
                metric,
                params=metric_params,
                method_params=None if saliency is not None else method_params,
                saliency=None if saliency is None else [m.astype(np.float32) for m in saliency],
                masks=None if masks is None else [mask.astype(np.uint8) for mask in masks],
                seed=seed,
                progress=forward,
            )
        except SaliencyError as error:
            if error.code in _REFUSED:
                raise CannotRun(error.reason, error.message) from None
            raise
        return [result.value for result in results]

    def explain(self, model: str, images: np.ndarray, method: str, *, method_params: Mapping[str, Any], seed: int) -> list[np.ndarray]:
        try:
            return [e.saliency for e in self.client.explain(model, list(images), method, params=method_params, seed=seed)]
        except SaliencyError as error:
            if error.code in _REFUSED:
                raise CannotRun(error.reason, error.message) from None
            raise
