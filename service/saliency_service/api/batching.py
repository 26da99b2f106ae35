"""Dynamic batching: concurrent Explain requests that make maps the same way share one engine call.

Requests for a model whose config has `dynamic_batching` are grouped by everything but their images
(method, parameters, target, foil, layers, seed). The first request of a group waits
`max_queue_delay_microseconds` for others; then the group joins the worker pool's queue, first in, first
out with every other job (Score, Verbalize, unbatched Explain). It stays open until a worker takes it:
the worker closes it and runs whatever it holds by then, as Triton forms a batch when a model instance
becomes available. So under load requests gather into larger batches while the group waits its turn,
instead of queueing one small batch behind another, and no job that came later overtakes it. A group
that holds `max_batch_size` images closes at once. Every method gives an image the map it would get
alone (the method contract test checks it), so a caller cannot tell, except by the cost.

Failure of the merged call is never shared blindly: when it fails for a reason one request may have
caused (a bad image, a cap), each request runs again on its own and gets its own answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import grpc

from saliency_service.api.work import Reservation, WorkPool
from saliency_service.core.budget import current_budget
from saliency_service.core.engine import Engine, ExplainJob
from saliency_service.core.errors import SaliencyError
from saliency_service.core.models.config import DynamicBatching
from saliency_service.core.types import Explanation
from saliency_service.observability import metrics

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
RPC = "Explain"


@dataclass
class _Member:
    job: ExplainJob
    context: Context | None
    result: asyncio.Future[list[Explanation]]


@dataclass
class _Group:
    key: str
    reservation: Reservation  # its place in the pool, held from the first request (admission control counts it)
    members: list[_Member] = field(default_factory=list)
    images: int = 0
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None  # set once the group is in the pool's queue


def _key(job: ExplainJob) -> str:
    """Everything that decides how maps are made, except the images."""
    return json.dumps(
        [job.model, job.method, job.params, repr(job.target), job.layer, job.seed, repr(job.foil), list(job.layers)],
        sort_keys=True,
        default=repr,
    )


class ExplainBatcher:
    def __init__(self, engine: Engine, pool: WorkPool) -> None:
        self.engine = engine
        self.pool = pool
        self._open: dict[str, _Group] = {}
        # Groups are joined on the event loop and closed by the worker that takes them.
        self._lock = threading.Lock()

    def _policy(self, job: ExplainJob) -> DynamicBatching | None:
        """The model's batching policy, or None when this request runs alone."""
        if job.baselines:  # per-image baselines would have to be merged in step with the images
            return None
        try:
            config = self.engine.repository.get(job.model).config
        except SaliencyError:
            return None  # unknown or not-ready model: the request's own run reports it
        policy = config.dynamic_batching
        if policy is None or policy.max_batch_size <= 1 or not 0 < len(job.images) < self._limit(policy):
            return None
        return policy

    def _limit(self, policy: DynamicBatching) -> int:
        return min(policy.max_batch_size, self.engine.limits.max_images)

    async def explain(self, job: ExplainJob, context: Context | None = None) -> list[Explanation]:
        policy = self._policy(job)
        if policy is None:
            return await self.pool.run(RPC, lambda: self.engine.explain(job), context, len(job.images))
        loop = asyncio.get_running_loop()
        key = _key(job)
        limit = self._limit(policy)
        member = _Member(job, context, loop.create_future())
        ready: list[_Group] = []  # closed for being full: into the queue now
        with self._lock:
            group = self._open.get(key)
            if group is not None and group.images + len(job.images) > limit:
                self._close(group)
                ready.append(group)
                group = None
            if group is None:
                group = self._open[key] = _Group(key, self.pool.reserve())
                group.timer = loop.call_later(policy.max_queue_delay_microseconds / 1e6, self._submit, group)
            group.members.append(member)
            group.images += len(job.images)
            if group.images >= limit:
                self._close(group)
                ready.append(group)
        for full in ready:
            self._submit(full)
        try:
            return await asyncio.shield(member.result)
        except asyncio.CancelledError:
            member.result.cancel()
            with self._lock:
                if group.task is not None and all(m.result.cancelled() for m in group.members):
                    self._close(group)  # nobody waits any more: no newcomer joins it,
                    group.task.cancel()  # and its work stops after its current pass
            raise

    def _close(self, group: _Group) -> None:
        """No request joins `group` from now on: it is full, or a worker has taken it (call with the lock held)."""
        if self._open.get(group.key) is group:
            del self._open[group.key]

    def _submit(self, group: _Group) -> None:
        """Put the group in the pool's queue (its delay has passed, or it is full); it stays open until a worker takes it."""
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        if group.task is None:
            group.task = asyncio.ensure_future(self._run(group))
            group.task.add_done_callback(lambda _: group.reservation.give_back())  # no-op once a job has it

    def _take(self, group: _Group) -> tuple[list[_Member], list[Explanation] | BaseException]:
        """In the worker: close the group, then explain everything it holds in one engine call."""
        with self._lock:
            self._close(group)
            members = [m for m in group.members if not m.result.cancelled()]
        if not members:
            return members, []
        budget = current_budget()
        if budget is not None and self.pool.max_pass_items:
            budget.max_pass_items = self.pool.max_pass_items * len(members)  # each request brings its own cap
        job = members[0].job
        if len(members) > 1:
            job = replace(job, images=[image for m in members for image in m.job.images])
        try:
            return members, self.engine.explain(job)
        except Exception as error:  # sorted out on the loop: per request, or for all
            return members, error

    async def _run(self, group: _Group) -> None:
        try:
            # How many requests the group serves is known when `_take` closes it; `_take` sets the budget's cap then.
            members, outcome = await self.pool.run(RPC, partial(self._take, group), None, requests=None, reservation=group.reservation)
        except asyncio.CancelledError:  # every caller gave up, or the server is stopping
            with self._lock:
                self._close(group)
            for member in group.members:
                member.result.cancel()
            raise
        except Exception as error:  # it never ran: the pool is shutting down
            with self._lock:
                self._close(group)
            for member in group.members:
                _settle(member, error=error)
            return
        if not members:
            return
        metrics.MERGED_REQUESTS.labels(RPC, members[0].job.model).observe(len(members))
        if isinstance(outcome, BaseException):
            if len(members) == 1:
                _settle(members[0], error=outcome)
            elif isinstance(outcome, SaliencyError):  # which request caused it is unknown: each runs on its own
                await asyncio.gather(*(self._alone(m) for m in members))
            else:
                log.error("merged Explain of %d requests failed", len(members), exc_info=outcome)
                for member in members:
                    _settle(member, error=outcome)
            return
        start = 0
        for member in members:
            metrics.REQUEST_IMAGES.labels(RPC).observe(len(member.job.images))
            _settle(member, outcome[start : start + len(member.job.images)])
            start += len(member.job.images)

    async def _alone(self, member: _Member) -> None:
        job = member.job
        try:
            maps = await self.pool.run(RPC, lambda: self.engine.explain(job), member.context, len(job.images))
            _settle(member, maps)
        except asyncio.CancelledError:
            member.result.cancel()
            raise
        except Exception as error:
            _settle(member, error=error)


def _settle(member: _Member, result: list[Explanation] | None = None, error: BaseException | None = None) -> None:
    if member.result.done():
        return
    if error is not None:
        member.result.set_exception(error)
    else:
        member.result.set_result(result or [])
