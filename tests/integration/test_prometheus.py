"""A real Prometheus scrapes the real `saliency-service serve` process, and the counters come back through its API.

Prometheus is Debian's `prometheus` package (`apt-get install -y prometheus`); without the binary the test skips.
Everything listens on and talks to 127.0.0.1 only; each wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saliency_client import SaliencyClient, SaliencyError
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary: install Debian's package (apt-get install -y prometheus) to run this test"
)

EXPLAIN_CALLS = 3
JOB = "saliency"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: Any, process: subprocess.Popen[bytes], log: Path, timeout: float) -> Any:
    """Poll `check` until it returns something truthy; fail with the process's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; log:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`saliency-service serve` on free 127.0.0.1 ports: (gRPC address, metrics port)."""
    folder = tmp_path_factory.mktemp("serve")
    port, metrics_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "SALIENCY_HOST": "127.0.0.1", "SALIENCY_TORCH_THREADS": "1", "SALIENCY_LOG_FORMAT": "text"}
    log = folder / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "saliency_service", "serve", "--port", str(port), "--metrics-port", str(metrics_port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def serving() -> bool:
        try:
            with grpc.insecure_channel(address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            return bool(status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    try:
        _wait("saliency-service SERVING", serving, process, log, timeout=180)
        yield address, metrics_port
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def prometheus(server: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus that scrapes the server's metrics port every second; yields its base URL."""
    assert PROMETHEUS is not None
    folder = tmp_path_factory.mktemp("prometheus")
    _, metrics_port = server
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    try:
        _wait("prometheus ready", ready, process, log, timeout=60)
        yield url
    finally:
        _stop(process)


def _query(url: str, expression: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expression})}", timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    assert body["data"]["resultType"] == "vector", body
    return list(body["data"]["result"])


def _poll(url: str, expression: str, done: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Query until `done(result)`; bounded. Returns the last result for the assertion message."""
    deadline = time.monotonic() + timeout
    result = _query(url, expression)
    while not done(result) and time.monotonic() < deadline:
        time.sleep(0.5)
        result = _query(url, expression)
    return result


def test_prometheus_scrapes_the_explain_calls(server: tuple[str, int], prometheus: str) -> None:
    address, metrics_port = server
    up = _poll(prometheus, f'up{{job="{JOB}"}}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")
    assert len(up) == 1 and up[0]["value"][1] == "1", up
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{metrics_port}"

    images = [generate(HELDOUT_SEED_OFFSET + i).image for i in range(EXPLAIN_CALLS)]
    with SaliencyClient(address, timeout=60) as client:
        for image in images:
            (explanation,) = client.explain("shapes", [image], method="grad_cam")
            assert explanation.saliency.shape == image.shape[:2]
        with pytest.raises(SaliencyError):
            client.explain("shapes", [images[0]], method="no_such_method")

    ok = f'saliency_requests_total{{job="{JOB}",rpc="Explain",model="shapes",method="grad_cam",code="OK"}}'
    result = _poll(prometheus, ok, lambda r: len(r) == 1 and float(r[0]["value"][1]) >= EXPLAIN_CALLS)
    assert len(result) == 1, result
    assert float(result[0]["value"][1]) == EXPLAIN_CALLS, result

    # the refused call is there too, its method name bounded to `unknown`, with its error code
    failed = _poll(prometheus, f'saliency_requests_total{{job="{JOB}",rpc="Explain",code!="OK"}}', lambda r: len(r) >= 1)
    assert [(r["metric"]["method"], float(r["value"][1])) for r in failed] == [("unknown", 1.0)], failed
    assert failed[0]["metric"]["code"] in {"INVALID_ARGUMENT", "NOT_FOUND"}, failed

    # and the latency histogram counted every Explain
    count = _poll(
        prometheus,
        f'sum(saliency_request_duration_seconds_count{{job="{JOB}",rpc="Explain"}})',
        lambda r: len(r) == 1 and float(r[0]["value"][1]) >= EXPLAIN_CALLS + 1,
    )
    assert float(count[0]["value"][1]) == EXPLAIN_CALLS + 1, count
