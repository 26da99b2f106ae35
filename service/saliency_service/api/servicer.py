"""SaliencyService: decode, run the engine in the worker pool, encode. Nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from saliency.v1 import saliency_service_pb2 as pb
from saliency.v1 import saliency_service_pb2_grpc as pb_grpc
from saliency_service.api import codec
from saliency_service.api.batching import ExplainBatcher
from saliency_service.api.work import WorkPool
from saliency_service.core.engine import Engine
from saliency_service.core.methods import METHODS
from saliency_service.core.metrics import METRICS
from saliency_service.core.verbalize import TEMPLATES
from saliency_service.core.verbalize.phrasebook import load_styles

Context = grpc.aio.ServicerContext[Any, Any]
PROGRESS_SECONDS = 0.1


class SaliencyServicer(pb_grpc.SaliencyServiceServicer):
    def __init__(self, engine: Engine, pool: WorkPool) -> None:
        self.engine = engine
        self.pool = pool
        self.batcher = ExplainBatcher(engine, pool)

    async def Explain(self, request: pb.ExplainRequest, context: Context) -> pb.ExplainResponse:
        job = codec.explain_job(request)
        explanations = await self.batcher.explain(job, context)
        return codec.explain_response(explanations, self.engine.repository.get(job.model).config.labels)

    async def Score(self, request: pb.ScoreRequest, context: Context) -> pb.ScoreResponse:
        job = codec.score_job(request)
        return codec.score_response(await self.pool.run("Score", lambda: self.engine.score(job), context, len(job.images)))

    async def ScoreStream(self, request: pb.ScoreRequest, context: Context) -> AsyncIterator[pb.ScoreEvent]:
        """Score, with progress events from the worker while it runs (at most every PROGRESS_SECONDS)."""
        job = codec.score_job(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[pb.ScoreEvent] = asyncio.Queue()
        last = [0.0]

        def progress(stage: str, done: int, total: int) -> None:  # runs in the worker thread
            now = time.monotonic()
            if done >= total or now - last[0] >= PROGRESS_SECONDS:
                last[0] = now
                loop.call_soon_threadsafe(events.put_nowait, codec.score_progress(stage, done, total))

        work = asyncio.ensure_future(self.pool.run("ScoreStream", lambda: self.engine.score(job, progress), context, len(job.images)))
        try:
            while not work.done():
                waiter = asyncio.ensure_future(events.get())
                await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield waiter.result()
                else:
                    waiter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield pb.ScoreEvent(response=codec.score_response(work.result()))
        finally:
            work.cancel()  # the caller went away: cancel the budget so the worker stops after its current pass

    async def Verbalize(self, request: pb.VerbalizeRequest, context: Context) -> pb.VerbalizeResponse:
        job = codec.verbalize_job(request)
        inputs = len(job.images) or len(job.saliency) or len(job.tokens)
        items = await self.pool.run("Verbalize", lambda: self.engine.verbalize(job), context, inputs)
        return codec.verbalize_response(items)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[codec.model(status) for status in self.engine.repository.statuses()])

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=codec.model(self.engine.repository.status(request.name)))

    async def ListMethods(self, request: pb.ListMethodsRequest, context: Context) -> pb.ListMethodsResponse:
        return pb.ListMethodsResponse(
            methods=[codec.method(cls) for cls in METHODS],
            metrics=[codec.metric(cls) for cls in METRICS],
            templates=[codec.template(cls) for cls in TEMPLATES],
            styles=[pb.Style(name=style.name, description=style.description) for style in load_styles().values()],
        )
