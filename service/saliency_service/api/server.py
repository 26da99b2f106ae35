"""Build and run the grpc.aio server: SaliencyService, the Open Inference Protocol, health (overall and per model), reflection."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from saliency.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from saliency.v1 import saliency_service_pb2 as pb
from saliency.v1 import saliency_service_pb2_grpc as pb_grpc
from saliency_service.api.interceptors import AdmissionGate, SaliencyInterceptor
from saliency_service.api.oip import SERVICE_NAME as OIP_SERVICE_NAME
from saliency_service.api.oip import InferenceServicer
from saliency_service.api.servicer import SaliencyServicer
from saliency_service.api.work import WorkPool
from saliency_service.config import Settings
from saliency_service.core.budget import charge_current
from saliency_service.core.engine import Engine
from saliency_service.core.errors import InvalidArgument
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
            RuntimeOptions.from_settings(settings),
            observer=_observe_pass,
        )
        self.engine = Engine(self.repository, ImageLimits(max_images=settings.max_batch_images, max_pixels=settings.max_image_pixels))
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="saliency-worker")
        self.pool = WorkPool(self.executor, settings.workers, settings.max_queue, settings.max_pass_items)
        # Read at each scrape (one server per process; in tests the latest server's pool).
        metrics.IDLE_WORKERS.set_function(lambda: self.pool.idle_workers)
        metrics.ADMITTED_JOBS.set_function(lambda: self.pool.outstanding)
        self.credentials = server_credentials(settings)
        self.auth_tokens = auth_tokens(settings)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self.gate = AdmissionGate()

    async def start(self) -> int:
        """Load the repository, bind, and start serving; returns the bound port."""
        statuses = await asyncio.get_running_loop().run_in_executor(self.executor, self.repository.load_all)
        known_methods = frozenset([*METHODS.names(), *METRICS.names(), *TEMPLATES.names()])
        known_models = frozenset(status.name for status in statuses)
        server = grpc.aio.server(
            interceptors=[
                SaliencyInterceptor(
                    self.settings.max_message_bytes, lambda: known_models, lambda: known_methods, tokens=self.auth_tokens, gate=self.gate
                )
            ],
            options=[
                # The transport cap is a backstop at twice the application cap, so that most oversized
                # requests get the application's RESOURCE_EXHAUSTED with an ErrorInfo naming the cap.
                ("grpc.max_receive_message_length", 2 * self.settings.max_message_bytes),
                ("grpc.max_send_message_length", 4 * self.settings.max_message_bytes),
            ],
        )
        pb_grpc.add_SaliencyServiceServicer_to_server(SaliencyServicer(self.engine, self.pool), server)
        inference = InferenceServicer(self.repository, self.pool, self.engine.limits, lambda: self.gate.open)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, OIP_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            if self.credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, self.credentials)
        except RuntimeError:  # grpc's "Failed to bind": a bad host, or a port in use
            self.port = 0
        if self.port == 0:
            raise InvalidArgument(
                "INVALID_SETTINGS", f"cannot bind {address} (settings host, port): not an address of this machine, or the port is in use"
            )
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
        self.gate.open = True
        log.info("serving on port %d with %d model(s) ready of %d", self.port, sum(s.ready for s in statuses), len(statuses))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period.

        The transport keeps running while the admitted calls drain, so a call that arrives meanwhile gets
        UNAVAILABLE SHUTTING_DOWN and health answers NOT_SERVING; the transport stops once they are done,
        and whatever is still running when the grace period ends is cancelled.
        """
        grace = self.settings.grace_seconds if grace is None else grace
        started = time.monotonic()
        self.gate.open = False
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            if not await self.gate.drained(grace):
                log.warning("%d call(s) still running after the %.0f s grace period are cancelled", self.gate.running, grace)
            await self._server.stop(max(0.0, grace - (time.monotonic() - started)))
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _observe_pass(model: str, kind: str, batch: int) -> None:
    """Count the pass for Prometheus and charge it to the running request's budget (which may stop the request)."""
    metrics.observe_pass(model, kind, batch)
    charge_current(batch)


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument("INVALID_SETTINGS", f"setting '{setting}': cannot read {path}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from the settings (mutual TLS with a client CA); None for a plaintext port."""
    if not settings.tls_cert_file and not settings.tls_key_file:
        if settings.tls_client_ca_file:
            raise InvalidArgument("INVALID_SETTINGS", "tls_client_ca_file needs tls_cert_file and tls_key_file: mutual TLS is TLS first")
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise InvalidArgument("INVALID_SETTINGS", "set both tls_cert_file and tls_key_file, or neither")
    pair = (_read("tls_key_file", settings.tls_key_file), _read("tls_cert_file", settings.tls_cert_file))
    ca = _read("tls_client_ca_file", settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def auth_tokens(settings: Settings) -> frozenset[str]:
    """The accepted bearer tokens; empty: no token check."""
    if not settings.auth_token_file:
        return frozenset()
    tokens = frozenset(line.strip() for line in _read("auth_token_file", settings.auth_token_file).decode().splitlines() if line.strip())
    if not tokens:
        raise InvalidArgument("INVALID_SETTINGS", f"auth_token_file {settings.auth_token_file} holds no token")
    return tokens
