"""The real `saliency-service serve` process: the README's flow, /metrics, and SIGTERM under load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from saliency_client import SaliencyClient
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, LABELS, generate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(address: str, process: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with {process.returncode}")
        try:
            with grpc.insecure_channel(address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not become SERVING")


class Server:
    def __init__(self, tmp: Path) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {**os.environ, "SALIENCY_HOST": "127.0.0.1", "SALIENCY_GRACE_SECONDS": "60", "SALIENCY_TORCH_THREADS": "1"}
        self.log = (tmp / "server.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "saliency_service", "serve", "--port", str(self.port), "--metrics-port", str(self.metrics_port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        _wait_serving(self.address, self.process)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("serve"))
    yield running
    running.stop()


def test_cli_explain_writes_an_overlay_and_prints_the_text(server: Server, tmp_path: Path) -> None:
    sample = generate(HELDOUT_SEED_OFFSET + 77)
    Image.fromarray(sample.image).save(tmp_path / "shape.png")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "saliency_client._cli",
            "explain",
            str(tmp_path / "shape.png"),
            "--model",
            "shapes",
            "--method",
            "grad_cam",
            "--out",
            str(tmp_path / "overlay.png"),
            "--server",
            server.address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"'{LABELS[sample.label]}'" in result.stdout
    assert "% of the positive evidence" in result.stdout
    overlay = np.asarray(Image.open(tmp_path / "overlay.png"))
    assert overlay.shape == sample.image.shape and overlay.dtype == np.uint8
    assert not np.array_equal(overlay, sample.image)


def test_metrics_endpoint_serves_prometheus_text(server: Server) -> None:
    with SaliencyClient(server.address) as client:
        client.list_models()
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'saliency_model_ready{model="shapes"} 1.0' in body
    assert 'saliency_requests_total{code="OK",method="",model="",rpc="ListModels"}' in body


def test_sigterm_drains_in_flight_work_and_exits_zero(tmp_path: Path) -> None:
    server = Server(tmp_path)
    try:
        images = [generate(HELDOUT_SEED_OFFSET + i).image for i in range(4)]
        outcome: dict[str, object] = {}

        def long_request() -> None:
            try:
                with SaliencyClient(server.address, timeout=120) as client:
                    outcome["result"] = client.explain("shapes", images, method="integrated_gradients", params={"steps": 512})
            except Exception as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(2.0)  # the request is in flight
        assert "result" not in outcome, "the request finished too soon to test draining; make it longer"
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as refused:
            with grpc.insecure_channel(server.address) as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        worker.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        assert len(outcome["result"]) == 4  # type: ignore[arg-type]
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
