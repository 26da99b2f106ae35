"""Dynamic batching: concurrent Explain requests that make maps the same way share one engine call.

Requests for a model whose config has `dynamic_batching` are grouped by everything but their images
(method, parameters, target, foil, layers, seed). The first request of a group waits
`max_queue_delay_microseconds` for others; then the group goes to a free worker. While every worker
is busy a due group stays open and goes when one frees (as Triton forms a batch when a model instance
becomes available), so under load requests gather into larger batches instead of queueing one small
batch behind another; the wait is the same, since the worker was not free anyway. A group that holds
`max_batch_size` images goes at once. Every method gives an image the map it would get alone (the
method contract test checks it), so a caller cannot tell, except by the cost.

Failure of the merged call is never shared blindly: when it fails for a reason one request may have
caused (a bad image, a cap), each request runs again on its own and gets its own answer. Only
SERVER_BUSY, which is the server's state and not any request's doing, goes to all of them at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from saliency_service.api.work import Reservation, WorkPool
from saliency_service.core.engine import Engine, ExplainJob
from saliency_service.core.errors import ResourceExhausted, SaliencyError
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
    reservation: Reservation  # its place in the pool, held from the first request (admission control counts it)
    members: list[_Member] = field(default_factory=list)
    images: int = 0
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None
    due: bool = False  # its delay has passed: it goes as soon as a worker is free


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
        pool.on_release(self._worker_free)

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
        group = self._open.get(key)
        if group is not None and group.images + len(job.images) > limit:
            self._start(key, group)
            group = None
        if group is None:
            group = self._open[key] = _Group(self.pool.reserve())
            group.timer = loop.call_later(policy.max_queue_delay_microseconds / 1e6, self._due, key, group)
        member = _Member(job, context, loop.create_future())
        group.members.append(member)
        group.images += len(job.images)
        if group.images >= limit:
            self._start(key, group)
        try:
            return await asyncio.shield(member.result)
        except asyncio.CancelledError:
            member.result.cancel()
            if group.task is not None and all(m.result.cancelled() for m in group.members):
                group.task.cancel()  # nobody waits any more: stop the work after its current pass
            raise

    def _due(self, key: str, group: _Group) -> None:
        """The group's delay has passed: it goes now if a worker is free, else when one frees."""
        group.timer = None
        group.due = True
        if self.pool.idle_workers > 0:
            self._start(key, group)

    def _worker_free(self) -> None:
        """A worker has freed: due groups go, oldest first, one per idle worker."""
        for key, group in list(self._open.items()):
            if self.pool.idle_workers <= 0:
                return
            if group.due:
                self._start(key, group)

    def _start(self, key: str, group: _Group) -> None:
        """Close the group to newcomers and send it to the pool."""
        if self._open.get(key) is group:
            del self._open[key]
        if group.timer is not None:
            group.timer.cancel()
        if group.task is None:
            group.reservation.dispatch()  # a worker counts as taken from now on
            group.task = asyncio.ensure_future(self._run(group))
            group.task.add_done_callback(lambda _: group.reservation.give_back())  # no-op once a job has it

    async def _run(self, group: _Group) -> None:
        members = [m for m in group.members if not m.result.cancelled()]
        if not members:
            return
        metrics.MERGED_REQUESTS.labels(RPC, members[0].job.model).observe(len(members))
        if len(members) == 1:
            await self._alone(members[0], group.reservation)
            return
        merged = replace(members[0].job, images=[image for m in members for image in m.job.images])
        try:
            maps = await self.pool.run(
                RPC, lambda: self.engine.explain(merged), None, len(merged.images), requests=len(members), reservation=group.reservation
            )
        except SaliencyError as error:
            if isinstance(error, ResourceExhausted) and error.reason == "SERVER_BUSY":
                for member in members:
                    _settle(member, error=error)
            else:  # which request caused it is unknown: each runs on its own and gets its own answer
                await asyncio.gather(*(self._alone(m) for m in members))
            return
        except asyncio.CancelledError:
            for member in members:
                member.result.cancel()
            raise
        except Exception as error:
            log.exception("merged Explain of %d requests failed", len(members))
            for member in members:
                _settle(member, error=error)
            return
        start = 0
        for member in members:
            metrics.REQUEST_IMAGES.labels(RPC).observe(len(member.job.images))
            _settle(member, maps[start : start + len(member.job.images)])
            start += len(member.job.images)

    async def _alone(self, member: _Member, reservation: Reservation | None = None) -> None:
        job = member.job
        try:
            maps = await self.pool.run(RPC, lambda: self.engine.explain(job), member.context, len(job.images), reservation=reservation)
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
