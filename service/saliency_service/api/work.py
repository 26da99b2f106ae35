"""The bounded pool that runs every RPC's blocking work, with admission control and cancellation.

At most `workers` jobs run and `max_queue` wait; a request beyond that gets RESOURCE_EXHAUSTED at once
instead of hanging in a queue. Each job runs under a RequestBudget: when the caller cancels or its
deadline passes, the budget is cancelled and the job stops after its current model pass, freeing its
worker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from saliency_service.core.budget import RequestBudget, budget_scope
from saliency_service.core.errors import ResourceExhausted
from saliency_service.observability import metrics

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


class Reservation:
    """A place in the pool taken before its job is ready: a batch still gathering requests.

    It counts against the pool's capacity from the start (so admission control sees it), but not as a
    busy worker until `dispatch`; `WorkPool.run(..., reservation=)` hands the place to the job, and
    `give_back` returns it when no job will come.
    """

    def __init__(self, pool: WorkPool) -> None:
        self._pool = pool
        self.waiting = True  # not yet sent to a worker
        self.held = True  # the place is still this reservation's (no job has it, nor was it given back)

    def dispatch(self) -> None:
        if self.waiting:
            self.waiting = False
            with self._pool._lock:
                self._pool._waiting -= 1

    def give_back(self) -> None:
        if self.held:
            self.dispatch()
            self.held = False
            self._pool._release()

    def hand_to_job(self) -> None:
        """The job now holds the place (the pool releases it when the job ends)."""
        if not self.held:
            raise RuntimeError("this reservation was used or given back already")
        self.dispatch()
        self.held = False


class WorkPool:
    def __init__(self, executor: Executor, workers: int, max_queue: int, max_pass_items: int = 0) -> None:
        self.executor = executor
        self.workers = workers
        self.max_queue = max_queue
        self.max_pass_items = max_pass_items
        self._outstanding = 0
        self._waiting = 0  # reservations not yet sent to a worker
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.workers + self.max_queue

    @property
    def outstanding(self) -> int:
        """Jobs running or waiting now."""
        return self._outstanding

    @property
    def idle_workers(self) -> int:
        """Workers with nothing to do now (0 while jobs wait in the queue)."""
        return max(0, self.workers - (self._outstanding - self._waiting))

    def reserve(self) -> Reservation:
        """Take a place now for a job that comes later; SERVER_BUSY when the pool is full."""
        self._admit()
        with self._lock:
            self._waiting += 1
        return Reservation(self)

    def _admit(self) -> None:
        with self._lock:
            if self._outstanding >= self.capacity:
                raise ResourceExhausted(
                    "SERVER_BUSY",
                    f"the server is at capacity: {self.workers} requests running and {self.max_queue} waiting (workers, max_queue); "
                    "retry with backoff",
                    {"workers": self.workers, "max_queue": self.max_queue},
                )
            self._outstanding += 1

    def _release(self) -> None:
        with self._lock:
            self._outstanding -= 1

    async def run(
        self,
        rpc: str,
        work: Callable[[], T],
        context: Context | None = None,
        images: int = 0,
        requests: int | None = 1,
        reservation: Reservation | None = None,
    ) -> T:
        """Run `work` in the pool under a fresh budget; cancelling the awaiting task cancels the budget.

        `requests`: how many requests the work serves; its compute cap is that many caps. None for a merged
        batch whose size is known only when a worker takes it: the budget starts uncapped, the work sets its
        cap (`max_pass_items` per request) before its first pass, and the batcher counts the images of each
        request itself.
        `reservation`: the place taken earlier with `reserve` (else one is taken now).
        """
        if reservation is None:
            self._admit()
        else:
            reservation.hand_to_job()
        if requests is not None:
            metrics.REQUEST_IMAGES.labels(rpc).observe(images)
        remaining = context.time_remaining() if context is not None else None
        budget = RequestBudget(self.max_pass_items * (requests or 0), None if remaining is None else time.monotonic() + remaining)
        queued = time.perf_counter()

        def job() -> T:
            metrics.QUEUE_SECONDS.labels(rpc).observe(time.perf_counter() - queued)
            with budget_scope(budget):
                return work()

        try:
            future = self.executor.submit(job)
        except BaseException:
            self._release()
            raise
        # Released when the job really ends (or is dropped from the queue), not when the caller goes away.
        future.add_done_callback(lambda _: self._release())
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            budget.cancel()
            future.cancel()
            raise
