"""Build and run the grpc.aio server: SaliencyService, the Open Inference Protocol, health (overall and per model), reflection."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from saliency.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from saliency.v1 import saliency_service_pb2 as pb
from saliency.v1 import saliency_service_pb2_grpc as pb_grpc
from saliency_service.api.interceptors import SaliencyInterceptor
from saliency_service.api.oip import SERVICE_NAME as OIP_SERVICE_NAME
from saliency_service.api.oip import InferenceServicer
from saliency_service.api.servicer import SaliencyServicer
from saliency_service.config import Settings
from saliency_service.core.engine import Engine
from saliency_service.core.images import ImageLimits
from saliency_service.core.methods import METHODS
from saliency_service.core.metrics import METRICS
from saliency_service.core.models.model import RuntimeOptions
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.verbalize import TEMPLATES
from saliency_service.observability import metrics

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SaliencyService"].full_name
OVERALL = ""


def model_health_name(model: str) -> str:
    """Per-model health service name, e.g. `saliency.v1.SaliencyService/shapes`."""
    return f"{SERVICE_NAME}/{model}"


class SaliencyServer:
    """The whole server: load models, serve, and shut down gracefully."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository = ModelRepository(
            settings.model_repository,
            RuntimeOptions(max_batch=settings.onnx_max_batch, threads=settings.onnx_threads, prefer_cuda=settings.prefer_cuda),
            observer=metrics.observe_pass,
        )
        self.engine = Engine(self.repository, ImageLimits(max_images=settings.max_batch_images, max_pixels=settings.max_image_pixels))
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="saliency-worker")
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._accepting = False

    async def start(self) -> int:
        """Load the repository, bind, and start serving; returns the bound port."""
        statuses = await asyncio.get_running_loop().run_in_executor(self.executor, self.repository.load_all)
        known_methods = frozenset([*METHODS.names(), *METRICS.names(), *TEMPLATES.names()])
        known_models = frozenset(status.name for status in statuses)
        server = grpc.aio.server(
            interceptors=[SaliencyInterceptor(self.settings.max_message_bytes, lambda: known_models, lambda: known_methods)],
            options=[
                # The transport cap is a backstop at twice the application cap, so that most oversized
                # requests get the application's RESOURCE_EXHAUSTED with an ErrorInfo naming the cap.
                ("grpc.max_receive_message_length", 2 * self.settings.max_message_bytes),
                ("grpc.max_send_message_length", 4 * self.settings.max_message_bytes),
            ],
        )
        pb_grpc.add_SaliencyServiceServicer_to_server(SaliencyServicer(self.engine, self.executor), server)
        inference = InferenceServicer(self.repository, self.executor, self.engine.limits, lambda: self._accepting)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, OIP_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        self.port = server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.settings.host}:{self.settings.port}")
        await server.start()
        self._server = server
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for status in statuses:
            metrics.MODEL_READY.labels(status.name).set(1 if status.ready else 0)
            await self.health.set(model_health_name(status.name), serving if status.ready else not_serving)
            if not status.ready:
                log.warning("model %s is NOT READY: %s", status.name, status.reason)
        await self.health.set(SERVICE_NAME, serving)
        await self.health.set(OVERALL, serving)
        self._accepting = True
        log.info("serving on port %d with %d model(s) ready of %d", self.port, sum(s.ready for s in statuses), len(statuses))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period."""
        self._accepting = False
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grace_seconds if grace is None else grace)
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
