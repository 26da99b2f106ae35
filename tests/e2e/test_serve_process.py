"""The real `saliency-service serve` process: the README's flow, /metrics, and SIGTERM under load."""

from __future__ import annotations

import importlib.util
import json
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

from saliency_client import SaliencyClient, SaliencyError
from saliency_service.config import Settings
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
    assert _gauges(server) == (Settings().workers, 0), "an idle pool: every worker idle, no job admitted"


def _gauges(server: Server) -> tuple[float, float]:
    """(saliency_idle_workers, saliency_admitted_jobs) from the server's /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    values = dict(line.split() for line in body.splitlines() if line.startswith(("saliency_idle_workers ", "saliency_admitted_jobs ")))
    return float(values["saliency_idle_workers"]), float(values["saliency_admitted_jobs"])


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
        assert _gauges(server) == (Settings().workers - 1, 1), "the long request holds one worker"
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # While the long request drains, health says NOT_SERVING and a new call is refused with a reason.
        with grpc.insecure_channel(server.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with SaliencyClient(server.address, timeout=10) as client, pytest.raises(SaliencyError) as refused:
            client.list_models()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and refused.value.reason == "SHUTTING_DOWN", refused.value
        worker.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        assert len(outcome["result"]) == 4  # type: ignore[arg-type]
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()


def test_tritonclient_works_unchanged(server: Server, tmp_path: Path) -> None:
    """The Open Inference Protocol through the real tritonclient package, in its own process."""
    # Only looked up, never imported here: tritonclient's messages share their names with the server's stubs.
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is installed by `make test` (see the Makefile)")
    samples = [generate(HELDOUT_SEED_OFFSET + 5), generate(HELDOUT_SEED_OFFSET + 6)]
    images = [sample.image for sample in samples]
    with SaliencyClient(server.address) as client:
        model = client.get_model("shapes")
        explanations = client.explain("shapes", images, method="grad_cam")
    mean = np.asarray(model.inputs.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(model.inputs.std, dtype=np.float32)[:, None, None]
    x = np.stack([(image.astype(np.float32).transpose(2, 0, 1) / 255.0 - mean) / std for image in images]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = Path(__file__).with_name("tritonclient_check.py")
    done = subprocess.run(
        [sys.executable, str(script), server.address, "shapes", str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server"]["name"] == "saliency-service"
    assert seen["metadata"]["inputs"][0]["shape"] == ["-1", "3", "128", "128"]
    assert {"name": "shapes", "version": model.version, "state": "READY"}.items() <= seen["index"]["models"][0].items()
    assert seen["id"] == "check-1"
    logits = np.asarray(seen["logits"])
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for row, explanation, classes in zip(probabilities, explanations, seen["classification"], strict=True):
        np.testing.assert_allclose(row, explanation.probabilities, atol=1e-5)
        value, index, label = classes[0].split(":")
        assert (int(index), label) == (explanation.predicted, LABELS[explanation.predicted])
        assert len(classes) == 3
    assert "NOT_FOUND" in seen["unknown_model_status"]
