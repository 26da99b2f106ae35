"""SaliencyService: decode, run the engine in the worker pool, encode. Nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from saliency.v1 import saliency_service_pb2 as pb
from saliency.v1 import saliency_service_pb2_grpc as pb_grpc
from saliency_service.api import codec
from saliency_service.core.engine import Engine
from saliency_service.core.methods import METHODS
from saliency_service.core.metrics import METRICS
from saliency_service.core.verbalize import TEMPLATES
from saliency_service.observability import metrics

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
J = TypeVar("J")


class SaliencyServicer(pb_grpc.SaliencyServiceServicer):
    def __init__(self, engine: Engine, executor: Executor) -> None:
        self.engine = engine
        self.executor = executor

    async def _run(self, rpc: str, work: Callable[[J], T], job: J, images: int) -> T:
        """Run blocking work in the bounded pool; the event loop stays free."""
        metrics.REQUEST_IMAGES.labels(rpc).observe(images)
        queued = time.perf_counter()

        def timed() -> T:
            metrics.QUEUE_SECONDS.labels(rpc).observe(time.perf_counter() - queued)
            return work(job)

        return await asyncio.get_running_loop().run_in_executor(self.executor, timed)

    async def Explain(self, request: pb.ExplainRequest, context: Context) -> pb.ExplainResponse:
        job = codec.explain_job(request)
        explanations = await self._run("Explain", self.engine.explain, job, len(job.images))
        return codec.explain_response(explanations, self.engine.repository.get(job.model).config.labels)

    async def Score(self, request: pb.ScoreRequest, context: Context) -> pb.ScoreResponse:
        job = codec.score_job(request)
        return codec.score_response(await self._run("Score", self.engine.score, job, len(job.images)))

    async def Verbalize(self, request: pb.VerbalizeRequest, context: Context) -> pb.VerbalizeResponse:
        job = codec.verbalize_job(request)
        return codec.verbalize_response(await self._run("Verbalize", self.engine.verbalize, job, len(job.images) or len(job.saliency)))

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[codec.model(status) for status in self.engine.repository.statuses()])

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=codec.model(self.engine.repository.status(request.name)))

    async def ListMethods(self, request: pb.ListMethodsRequest, context: Context) -> pb.ListMethodsResponse:
        return pb.ListMethodsResponse(
            methods=[codec.method(cls) for cls in METHODS],
            metrics=[codec.metric(cls) for cls in METRICS],
            templates=[codec.template(cls) for cls in TEMPLATES],
        )
