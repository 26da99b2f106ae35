"""A request's budget: cancellation, deadline and a cap on model work, checked after every model pass.

Every forward and backward pass goes through LoadedModel, which reports it to an observer; the server's
observer charges the pass to the budget of the request running on that thread. So any method, however
many passes it makes (RISE's masks, IG's steps, Score's curves), stops within one pass of a cancel or a
deadline, and a request that would need more than `max_pass_items` items through the model fails with
RESOURCE_EXHAUSTED naming the cap, without per-method cost formulas.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from saliency_service.core.errors import Cancelled, DeadlineExceeded, ResourceExhausted


class RequestBudget:
    def __init__(self, max_pass_items: int = 0, deadline: float | None = None) -> None:
        """`max_pass_items`: 0 for no cap. `deadline`: a time.monotonic() value, or None."""
        self.max_pass_items = max_pass_items
        self.deadline = deadline
        self.items = 0
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the work to stop; thread-safe, takes effect at its next pass."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def charge(self, items: int) -> None:
        """Count a pass of `items` items, then raise if the request must stop."""
        self.items += items
        self.check()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled("CANCELLED", "the request was cancelled; its work stopped")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("DEADLINE_EXCEEDED", "the request's deadline passed before its work finished; raise the deadline")
        if self.max_pass_items and self.items > self.max_pass_items:
            raise ResourceExhausted(
                "COMPUTE_LIMIT",
                f"the request needs more than {self.max_pass_items} items through the model (max_pass_items); "
                "lower steps, masks or samples, or send fewer images",
                {"limit": self.max_pass_items, "items": self.items},
            )


_local = threading.local()


@contextmanager
def budget_scope(budget: RequestBudget) -> Iterator[RequestBudget]:
    """Make `budget` the current thread's budget while the block runs."""
    previous = getattr(_local, "budget", None)
    _local.budget = budget
    try:
        budget.check()
        yield budget
    finally:
        _local.budget = previous


def current_budget() -> RequestBudget | None:
    """The budget of the request running on this thread, or None outside a request."""
    budget: RequestBudget | None = getattr(_local, "budget", None)
    return budget


def charge_current(items: int) -> None:
    """Charge a pass to the current thread's budget, if it has one (work outside a request has none)."""
    budget = current_budget()
    if budget is not None:
        budget.charge(items)
