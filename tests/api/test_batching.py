"""Dynamic batching: concurrent Explain requests for a model with `dynamic_batching` share one engine call,
and each caller still gets exactly its own answer (its maps, or its own error)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from saliency_client import AsyncSaliencyClient, DeadlineExceededError, InvalidArgumentError
from saliency_service.api.batching import ExplainBatcher
from saliency_service.api.work import WorkPool
from saliency_service.config import EMBEDDED_REPOSITORY, Settings
from saliency_service.core.budget import RequestBudget, budget_scope
from saliency_service.core.engine import Engine, ExplainJob
from saliency_service.core.errors import FailedPrecondition, ResourceExhausted
from saliency_service.core.models.config import ModelConfig
from saliency_service.core.types import RawTensor
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate

from .conftest import RunningServer, start_server, stop_server

MAX_BATCH = 4
# Long enough that requests sent together meet even on a loaded machine.
DELAY_US = 400_000


def _copy(root: Path, name: str, batching: object) -> None:
    shutil.copytree(EMBEDDED_REPOSITORY / "shapes", root / name)
    config = json.loads((root / name / "config.json").read_text())
    config["name"] = name
    config["dynamic_batching"] = batching
    (root / name / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("batching-repository")
    _copy(root, "batched", {"max_batch_size": MAX_BATCH, "max_queue_delay_microseconds": DELAY_US})
    running = start_server(Settings(model_repository=root, host="127.0.0.1", port=0, metrics_port=0, workers=2, grace_seconds=1.0))
    yield running
    stop_server(running)


def _images(count: int) -> list[np.ndarray]:
    return [generate(HELDOUT_SEED_OFFSET + 40 + i).image for i in range(count)]


def _raw(image: np.ndarray) -> RawTensor:
    return RawTensor("uint8", image.shape, image.tobytes())


def _alone(running: RunningServer, image: np.ndarray, method: str) -> np.ndarray:
    """The map the engine gives this image on its own, with no batching in between."""
    (explanation,) = running.server.engine.explain(ExplainJob("batched", [_raw(image)], method))
    return explanation.saliency


def _merged() -> tuple[float, float]:
    """(engine calls, requests they served) for `batched` so far."""
    labels = {"rpc": "Explain", "model": "batched"}
    count = REGISTRY.get_sample_value("saliency_dynamic_batch_requests_count", labels) or 0.0
    total = REGISTRY.get_sample_value("saliency_dynamic_batch_requests_sum", labels) or 0.0
    return count, total


async def _explain_all(address: str, calls: list[tuple[object, str, float]]) -> list[object]:
    """Send every (image, method, timeout) at once; each outcome is a list of explanations or the error."""
    async with AsyncSaliencyClient(address) as client:

        async def one(image: object, method: str, timeout: float) -> object:
            try:
                return await asyncio.wait_for(client.explain("batched", [image], method=method), timeout)
            except Exception as error:
                return error

        return list(await asyncio.gather(*(one(*call) for call in calls)))


def test_concurrent_requests_share_one_engine_call_and_each_gets_its_own_map(batching_server: RunningServer) -> None:
    images = _images(MAX_BATCH)
    before = _merged()
    outcomes = asyncio.run(_explain_all(batching_server.address, [(image, "grad_cam", 60.0) for image in images]))
    calls, served = (after - b for after, b in zip(_merged(), before, strict=True))
    assert (calls, served) == (1, MAX_BATCH), "a full group goes as one engine call"
    for image, outcome in zip(images, outcomes, strict=True):
        assert isinstance(outcome, list), outcome
        np.testing.assert_allclose(outcome[0].saliency, _alone(batching_server, image, "grad_cam"), rtol=1e-4, atol=1e-5)


def test_a_bad_image_fails_alone_and_the_others_are_answered(batching_server: RunningServer) -> None:
    good = _images(2)
    bad = b"these bytes are no image"  # only the server can tell
    calls = [(good[0], "saliency", 60.0), (bad, "saliency", 60.0), (good[1], "saliency", 60.0)]
    outcomes = asyncio.run(_explain_all(batching_server.address, calls))
    assert isinstance(outcomes[1], InvalidArgumentError), outcomes[1]
    for image, outcome in zip(good, (outcomes[0], outcomes[2]), strict=True):
        assert isinstance(outcome, list), outcome
        np.testing.assert_allclose(outcome[0].saliency, _alone(batching_server, image, "saliency"), rtol=1e-4, atol=1e-6)


def test_requests_that_make_maps_differently_are_not_merged(batching_server: RunningServer) -> None:
    images = _images(2)
    before = _merged()
    outcomes = asyncio.run(_explain_all(batching_server.address, [(images[0], "grad_cam", 60.0), (images[1], "saliency", 60.0)]))
    assert all(isinstance(o, list) for o in outcomes), outcomes
    calls, served = (after - b for after, b in zip(_merged(), before, strict=True))
    assert (calls, served) == (2, 2)
    assert outcomes[0][0].provenance.method == "grad_cam" and outcomes[1][0].provenance.method == "saliency"  # type: ignore[index]


def test_a_caller_that_gives_up_while_waiting_leaves_the_others_answered(batching_server: RunningServer) -> None:
    images = _images(3)
    calls = [(images[0], "grad_cam", 60.0), (images[1], "grad_cam", 0.05), (images[2], "grad_cam", 60.0)]
    outcomes = asyncio.run(_explain_all(batching_server.address, calls))
    assert isinstance(outcomes[1], (TimeoutError, DeadlineExceededError)), outcomes[1]
    for index in (0, 2):
        assert isinstance(outcomes[index], list), outcomes[index]
        np.testing.assert_allclose(outcomes[index][0].saliency, _alone(batching_server, images[index], "grad_cam"), rtol=1e-4, atol=1e-5)  # type: ignore[index]


class _CountingEngine:
    """The server's engine, recording how many images each engine call held."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.repository = engine.repository
        self.limits = engine.limits
        self.calls: list[int] = []

    def explain(self, job: ExplainJob) -> list[object]:
        self.calls.append(len(job.images))
        return self.engine.explain(job)  # type: ignore[return-value]


def test_a_due_group_waits_for_a_free_worker_and_gathers_the_requests_that_come_meanwhile(batching_server: RunningServer) -> None:
    """With the only worker busy, requests that arrive one delay apart end in one merged call once it frees."""
    delay = DELAY_US / 1e6
    engine = _CountingEngine(batching_server.server.engine)
    images = _images(3)
    raw = [_raw(image) for image in images]
    release = threading.Event()

    async def scenario() -> tuple[list[object], bool]:
        with ThreadPoolExecutor(1) as executor:
            pool = WorkPool(executor, workers=1, max_queue=8)
            batcher = ExplainBatcher(engine, pool)  # type: ignore[arg-type]
            blocker = asyncio.ensure_future(pool.run("Block", release.wait))
            calls = []
            for index, tensor in enumerate(raw):
                calls.append(asyncio.ensure_future(batcher.explain(ExplainJob("batched", [tensor], "grad_cam"))))
                if index < len(raw) - 1:
                    await asyncio.sleep(1.5 * delay)  # the open group is due before the next request comes
            await asyncio.sleep(0)  # the last request joins the group before the worker frees (else the worker may win the race)
            nothing_yet = not any(call.done() for call in calls) and engine.calls == []
            release.set()
            await blocker
            return list(await asyncio.gather(*calls)), nothing_yet

    outcomes, nothing_yet = asyncio.run(scenario())
    assert nothing_yet, "nothing runs while the only worker is busy"
    assert engine.calls == [3], "the group stayed open past its delay and took in the later requests"
    for image, outcome in zip(images, outcomes, strict=True):
        np.testing.assert_allclose(outcome[0].saliency, _alone(batching_server, image, "grad_cam"), rtol=1e-4, atol=1e-5)  # type: ignore[index]


def test_a_due_group_keeps_its_place_in_the_queue_ahead_of_later_jobs(batching_server: RunningServer) -> None:
    """A group whose delay has passed waits in the pool's queue like any job: a Score that comes later runs after it,
    and an Explain that comes before a worker frees still joins it."""
    delay = DELAY_US / 1e6
    engine = _CountingEngine(batching_server.server.engine)
    images = _images(2)
    release = threading.Event()
    order: list[str] = []

    class Recording(_CountingEngine):
        def explain(self, job: ExplainJob) -> list[object]:
            order.append(f"explain {len(job.images)}")
            return super().explain(job)

    recording = Recording(engine.engine)

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(1) as executor:
            pool = WorkPool(executor, workers=1, max_queue=8)
            batcher = ExplainBatcher(recording, pool)  # type: ignore[arg-type]
            blocker = asyncio.ensure_future(pool.run("Block", release.wait))
            first = asyncio.ensure_future(batcher.explain(ExplainJob("batched", [_raw(images[0])], "grad_cam")))
            await asyncio.sleep(1.5 * delay)  # the group is due: in the queue behind the blocker
            score = asyncio.ensure_future(pool.run("Score", lambda: order.append("score")))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(batcher.explain(ExplainJob("batched", [_raw(images[1])], "grad_cam")))
            await asyncio.sleep(0.05)
            release.set()
            await asyncio.gather(blocker, score)
            return list(await asyncio.gather(first, second))

    outcomes = asyncio.run(scenario())
    assert order == ["explain 2", "score"], "first in, first out; and the waiting group took the later Explain in"
    for image, outcome in zip(images, outcomes, strict=True):
        np.testing.assert_allclose(outcome[0].saliency, _alone(batching_server, image, "grad_cam"), rtol=1e-4, atol=1e-5)  # type: ignore[index]


def test_a_merged_call_has_the_compute_cap_of_all_its_requests(batching_server: RunningServer) -> None:
    """Each request brings its own `max_pass_items`: three requests that each fit their cap exactly run as one
    call under three caps (one cap would fail the merged call and send each request round again on its own)."""
    engine = _CountingEngine(batching_server.server.engine)
    images = _images(3)
    budget = RequestBudget()
    with budget_scope(budget):
        _alone(batching_server, images[0], "grad_cam")
    cap = budget.items
    release = threading.Event()

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(1) as executor:
            pool = WorkPool(executor, workers=1, max_queue=8, max_pass_items=cap)
            batcher = ExplainBatcher(engine, pool)  # type: ignore[arg-type]
            blocker = asyncio.ensure_future(pool.run("Block", release.wait))
            calls = [asyncio.ensure_future(batcher.explain(ExplainJob("batched", [_raw(image)], "grad_cam"))) for image in images]
            await asyncio.sleep(0)
            release.set()
            await blocker
            return list(await asyncio.gather(*calls))

    outcomes = asyncio.run(scenario())
    assert cap > 0 and engine.calls == [3], "one merged call, within the three requests' caps together"
    for image, outcome in zip(images, outcomes, strict=True):
        np.testing.assert_allclose(outcome[0].saliency, _alone(batching_server, image, "grad_cam"), rtol=1e-4, atol=1e-5)  # type: ignore[index]


def test_a_due_group_goes_at_once_when_a_worker_is_free(batching_server: RunningServer) -> None:
    engine = _CountingEngine(batching_server.server.engine)
    (image,) = _images(1)

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(1) as executor:
            batcher = ExplainBatcher(engine, WorkPool(executor, workers=1, max_queue=8))  # type: ignore[arg-type]
            # Nothing else runs, so no worker will ever be released: the group must go on its delay alone.
            return await asyncio.wait_for(batcher.explain(ExplainJob("batched", [_raw(image)], "grad_cam")), 60)

    (explanation,) = asyncio.run(scenario())
    assert engine.calls == [1]
    np.testing.assert_allclose(explanation.saliency, _alone(batching_server, image, "grad_cam"), rtol=1e-4, atol=1e-5)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "batching",
    [
        {"max_batch_size": 0},
        {"max_batch_size": 4, "max_queue_delay_microseconds": -1},
        {"max_batch_size": 4, "delay": 5},
        {"max_batch_size": 2.5},
    ],
)
def test_a_bad_batching_policy_makes_the_model_not_ready_with_the_reason(tmp_path: Path, batching: object) -> None:
    _copy(tmp_path, "batched", batching)
    with pytest.raises(FailedPrecondition) as caught:
        ModelConfig.load(tmp_path / "batched")
    assert caught.value.reason == "MODEL_CONFIG_INVALID"
    assert "dynamic_batching" in caught.value.message or "DynamicBatching" in caught.value.message


def test_the_shipped_models_batch() -> None:
    for name in ("shapes", "vit_shapes"):
        policy = ModelConfig.load(EMBEDDED_REPOSITORY / name).dynamic_batching
        assert policy is not None and policy.max_batch_size > 1


def test_grpc_status_of_an_unbatched_error_is_unchanged(batching_server: RunningServer) -> None:
    """A request the batcher cannot route (unknown model) gets the same NOT_FOUND as without batching."""

    async def call() -> grpc.StatusCode:
        async with AsyncSaliencyClient(batching_server.address) as client:
            try:
                await client.explain("nope", [_images(1)[0]])
            except Exception as error:
                return error.code  # type: ignore[attr-defined, no-any-return]
        return grpc.StatusCode.OK

    assert asyncio.run(call()) == grpc.StatusCode.NOT_FOUND


def test_a_reservation_counts_against_capacity_but_not_as_a_busy_worker_until_it_is_sent() -> None:
    with ThreadPoolExecutor(1) as executor:
        pool = WorkPool(executor, workers=1, max_queue=1)
        first, second = pool.reserve(), pool.reserve()
        with pytest.raises(ResourceExhausted) as caught:
            pool.reserve()
        assert caught.value.reason == "SERVER_BUSY"
        assert (pool.outstanding, pool.idle_workers) == (2, 1), "a batch still gathering holds a place, not a worker"
        first.dispatch()
        assert pool.idle_workers == 0
        assert asyncio.run(pool.run("Explain", lambda: 7, reservation=first)) == 7
        with pytest.raises(RuntimeError):
            asyncio.run(pool.run("Explain", lambda: 7, reservation=first))
        second.give_back()
        second.give_back()  # twice is once
        assert (pool.outstanding, pool.idle_workers) == (0, 1)
