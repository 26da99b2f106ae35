"""Health (overall and per model), reflection, and Prometheus metrics recorded at the seams."""

from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from saliency_client import SaliencyClient
from saliency_service.api.server import SERVICE_NAME, model_health_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_overall_and_per_model(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = lambda service: stub.Check(health_pb2.HealthCheckRequest(service=service)).status  # noqa: E731
        assert check("") == SERVING
        assert check(SERVICE_NAME) == SERVING
        assert check(model_health_name("shapes")) == SERVING
        assert check(model_health_name("broken")) == NOT_SERVING


def test_reflection_lists_the_service(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (response,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {service.name for service in response.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def _sample(name: str, labels: dict[str, str]) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_metrics_count_requests_passes_and_errors(client: SaliencyClient) -> None:
    ok = {"rpc": "Explain", "model": "shapes", "method": "grad_cam", "code": "OK"}
    bad = {"rpc": "Explain", "model": "unknown", "method": "grad_cam", "code": "NOT_FOUND"}
    before_ok, before_bad = _sample("saliency_requests_total", ok), _sample("saliency_requests_total", bad)
    before_fwd = _sample("saliency_model_passes_total", {"model": "shapes", "kind": "forward"})
    before_bwd = _sample("saliency_model_passes_total", {"model": "shapes", "kind": "backward"})
    client.explain("shapes", [np.zeros((32, 32, 3), np.uint8)], method="grad_cam")
    try:
        client.explain("no-such-model", [np.zeros((32, 32, 3), np.uint8)], method="grad_cam")
    except Exception:
        pass
    assert _sample("saliency_requests_total", ok) == before_ok + 1
    assert _sample("saliency_requests_total", bad) == before_bad + 1
    assert _sample("saliency_model_passes_total", {"model": "shapes", "kind": "forward"}) >= before_fwd + 1
    assert _sample("saliency_model_passes_total", {"model": "shapes", "kind": "backward"}) == before_bwd + 1
    assert _sample("saliency_request_duration_seconds_count", {"rpc": "Explain", "model": "shapes", "method": "grad_cam"}) >= 1
    assert _sample("saliency_model_ready", {"model": "shapes"}) == 1
    assert _sample("saliency_model_ready", {"model": "broken"}) == 0
    assert _sample("saliency_in_flight_requests", {"rpc": "Explain"}) == 0
