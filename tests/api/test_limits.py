"""Admission control, deadlines, cancellation and the compute cap, on a server with one worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from saliency.v1 import saliency_service_pb2_grpc as pb_grpc
from saliency_client import SaliencyClient, SaliencyError
from saliency_client._codec import explain_request
from saliency_service.config import Settings
from saliency_service.core.budget import RequestBudget, budget_scope, charge_current
from saliency_service.core.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate

from .conftest import RunningServer, start_server, stop_server

# IG with this many steps on 8 images is about 8k backward items in passes of 16: seconds of work, many passes.
LONG = {"steps": 1024}


@pytest.fixture(scope="module")
def small_server(model_repository: Path) -> Iterator[RunningServer]:
    settings = Settings(
        model_repository=model_repository,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        workers=1,
        max_queue=1,
        onnx_max_batch=16,
        max_pass_items=5_000,
        grace_seconds=1.0,
    )
    running = start_server(settings)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [generate(HELDOUT_SEED_OFFSET + 900 + i).image for i in range(4)]


def _wait_for(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_beyond_workers_plus_queue_is_resource_exhausted_at_once(small_server: RunningServer, images: list[np.ndarray]) -> None:
    pool = small_server.server.pool
    outcomes: list[object] = []

    def long_call(seed: int) -> None:
        # Different seeds: dynamic batching would merge two identical calls into one job.
        with SaliencyClient(small_server.address, timeout=8) as client:
            try:
                outcomes.append(client.explain("shapes", images[:1], method="integrated_gradients", params={"steps": 512}, seed=seed))
            except SaliencyError as error:
                outcomes.append(error)

    threads = [threading.Thread(target=long_call, args=(seed,)) for seed in range(2)]
    for thread in threads:
        thread.start()
    assert _wait_for(lambda: pool.outstanding == 2, 10.0), "two calls should be running or queued"
    with SaliencyClient(small_server.address, timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(SaliencyError) as busy:
            client.explain("shapes", images[:1], method="saliency")
        refused_after = time.monotonic() - started
    assert busy.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and busy.value.reason == "SERVER_BUSY"
    assert "max_queue" in str(busy.value)
    # Refused without waiting for the running work (which takes seconds), not queued behind it.
    assert pool.outstanding == 2 and refused_after < 8
    for thread in threads:
        thread.join(timeout=60)
    assert _wait_for(lambda: pool.outstanding == 0, 30.0)


def test_a_deadline_stops_the_work_and_frees_the_worker(small_server: RunningServer, images: list[np.ndarray]) -> None:
    pool = small_server.server.pool
    with SaliencyClient(small_server.address, timeout=1.0) as client:
        with pytest.raises(SaliencyError) as late:
            client.explain("shapes", images, method="integrated_gradients", params=LONG)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The work stops at its next pass (passes of 16 items), long before its natural end.
    assert _wait_for(lambda: pool.outstanding == 0, 5.0), "the cancelled work still holds the worker"
    with SaliencyClient(small_server.address, timeout=60) as client:
        (explanation,) = client.explain("shapes", images[:1], method="grad_cam")
    assert np.isfinite(explanation.saliency).all()


def test_a_cancelled_call_stops_its_work(small_server: RunningServer, images: list[np.ndarray]) -> None:
    pool = small_server.server.pool
    with grpc.insecure_channel(small_server.address) as channel:
        request = explain_request("shapes", images, "integrated_gradients", None, LONG, None, 0)
        call = pb_grpc.SaliencyServiceStub(channel).Explain.future(request)
        assert _wait_for(lambda: pool.outstanding == 1, 10.0)
        call.cancel()
        assert _wait_for(lambda: pool.outstanding == 0, 5.0), "the cancelled work still holds the worker"


def test_the_compute_cap_names_itself(model_repository: Path, images: list[np.ndarray]) -> None:
    settings = Settings(model_repository=model_repository, host="127.0.0.1", port=0, metrics_port=0, max_pass_items=50, grace_seconds=1.0)
    capped_server = start_server(settings)
    try:
        with SaliencyClient(capped_server.address, timeout=60) as client:
            (fits,) = client.explain("shapes", images[:1], method="integrated_gradients", params={"steps": 32})
            assert np.isfinite(fits.saliency).all()
            with pytest.raises(SaliencyError) as capped:
                client.explain("shapes", images[:1], method="integrated_gradients", params={"steps": 64})
    finally:
        stop_server(capped_server)
    assert capped.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and capped.value.reason == "COMPUTE_LIMIT"
    assert "max_pass_items" in str(capped.value)


def test_budget_checks_cancel_deadline_and_cap() -> None:
    budget = RequestBudget(max_pass_items=10)
    with budget_scope(budget):
        charge_current(10)
        with pytest.raises(ResourceExhausted):
            charge_current(1)
    assert budget.items == 11
    charge_current(10**9)  # outside a scope nothing is charged
    cancelled = RequestBudget()
    cancelled.cancel()
    with pytest.raises(Cancelled):
        with budget_scope(cancelled):
            pass
    late = RequestBudget(deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        late.charge(1)
