"""A per-process cap on upstream calls in flight, with a bounded, prioritised wait queue.

Why: an overloaded upstream should see a steady ``max_inflight`` calls, not the whole
backlog; callers wait in line instead, health checks first (so the gateway can still tell
that a module is alive), then analysis, then everything else, FIFO within a priority. The
queue is bounded: when it is full the newest of the lowest-priority waiters is shed, so a
burst of background work can never push out a health check.

A released slot is handed straight to the next waiter (the in-flight count does not drop
and rise again), so a newcomer can never overtake the queue. Each priority has its own FIFO
deque: serving is "first of the best non-empty deque", shedding is "last of the worst", both
O(1). Deadlines are loop timers, so a waiter leaves with ``QueueTimeout`` on time without a
polling task.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.core.clock import Clock

HEALTH = 0
ANALYSIS = 1
OTHER = 2
PRIORITY_NAMES = {HEALTH: "health", ANALYSIS: "analysis", OTHER: "other"}
_PRIORITY_BY_NAME = {name: value for value, name in PRIORITY_NAMES.items()}


def priority_from_name(name: str) -> int:
    """``"health"`` / ``"analysis"`` / ``"other"`` to its priority; anything else is a bug."""
    try:
        return _PRIORITY_BY_NAME[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown priority {name!r}; use one of {sorted(_PRIORITY_BY_NAME)}"
        ) from None


class Overloaded(Exception):
    """Shed: the queue is full of equal or better work (HTTP 503 ``service_overloaded``)."""

    def __init__(self, priority: int, retry_after: float) -> None:
        super().__init__(f"overloaded ({PRIORITY_NAMES.get(priority, priority)})")
        self.priority = priority
        self.retry_after = retry_after


class QueueTimeout(Exception):
    """The caller's deadline passed while it waited for a slot (HTTP 504)."""

    def __init__(self, priority: int) -> None:
        super().__init__(f"deadline passed in queue ({PRIORITY_NAMES.get(priority, priority)})")
        self.priority = priority


class _Waiter:
    __slots__ = ("future", "priority", "queued")

    def __init__(self, priority: int, future: asyncio.Future[None]) -> None:
        self.priority = priority
        self.future = future
        self.queued = True


class PriorityLimiter:
    """At most ``max_inflight`` holders; at most ``queue_max`` waiters, served by priority."""

    def __init__(
        self,
        max_inflight: int,
        queue_max: int,
        clock: Clock = time.monotonic,
        retry_after: float = 1.0,
    ) -> None:
        if max_inflight < 1 or queue_max < 0:
            raise ValueError("max_inflight must be >= 1 and queue_max >= 0")
        self.max_inflight = max_inflight
        self.queue_max = queue_max
        self.clock = clock
        self.retry_after = retry_after
        self._inflight = 0
        self._queued = 0
        self._queues: dict[int, deque[_Waiter]] = {}
        self._priorities: list[int] = []  # sorted keys of _queues, best first

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queued(self) -> int:
        return self._queued

    async def acquire(self, priority: int, deadline: float | None = None) -> None:
        """Wait for a slot; raise ``Overloaded`` if shed, ``QueueTimeout`` past ``deadline``.

        ``deadline`` is on the limiter's clock. A slot is free only when nobody waits
        (slots go straight to waiters), so the fast path is one comparison and a counter.
        """
        if self._inflight < self.max_inflight and not self._queued:
            self._inflight += 1
            return
        if deadline is not None and deadline <= self.clock():
            raise QueueTimeout(priority)
        self._make_room(priority)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(priority, loop.create_future())
        self._queue(priority).append(waiter)
        self._queued += 1
        timer = None
        if deadline is not None:
            timer = loop.call_later(deadline - self.clock(), self._expire, waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def release(self) -> None:
        """Give the slot to the best waiter, or free it (above a lowered cap: free it)."""
        if self._inflight <= self.max_inflight and self._wake_next():
            return
        if self._inflight <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._inflight -= 1

    def resize(self, max_inflight: int) -> None:
        """A new cap, live: a higher one serves waiters at once; with a lower one the
        holders above it drain (their releases free slots instead of handing them on)."""
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.max_inflight = max_inflight
        while self._inflight < max_inflight and self._wake_next():
            self._inflight += 1

    def _wake_next(self) -> bool:
        """Hand a slot to the best waiter still waiting; False when there is none."""
        for priority in self._priorities:
            queue = self._queues[priority]
            while queue:
                waiter = queue.popleft()
                waiter.queued = False
                self._queued -= 1
                if not waiter.future.done():  # skip one cancelled a moment ago
                    waiter.future.set_result(None)
                    return True
        return False

    @asynccontextmanager
    async def slot(self, priority: int, deadline: float | None = None) -> AsyncIterator[None]:
        await self.acquire(priority, deadline)
        try:
            yield
        finally:
            self.release()

    def _queue(self, priority: int) -> deque[_Waiter]:
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._queues[priority] = deque()
            bisect.insort(self._priorities, priority)
        return queue

    def _make_room(self, priority: int) -> None:
        """Shed the newest of the worst waiters for a better newcomer, or the newcomer."""
        if self._queued < self.queue_max:
            return
        for worst in reversed(self._priorities):
            queue = self._queues[worst]
            if queue:
                break
        else:
            raise Overloaded(priority, self.retry_after)  # queue_max == 0
        if priority >= worst:
            raise Overloaded(priority, self.retry_after)
        victim = queue.pop()
        victim.queued = False
        self._queued -= 1
        victim.future.set_exception(Overloaded(victim.priority, self.retry_after))

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._unqueue(waiter)
        waiter.future.set_exception(QueueTimeout(waiter.priority))

    def _unqueue(self, waiter: _Waiter) -> None:
        if waiter.queued:
            self._queues[waiter.priority].remove(waiter)
            waiter.queued = False
            self._queued -= 1

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiter's task was cancelled (client gone): leave no slot or entry behind."""
        self._unqueue(waiter)
        future = waiter.future
        # A slot handed over just before the cancellation goes to the next waiter; reading
        # exception() also marks a shed/timeout error as seen.
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release()


__all__ = [
    "ANALYSIS",
    "HEALTH",
    "OTHER",
    "PRIORITY_NAMES",
    "Overloaded",
    "PriorityLimiter",
    "QueueTimeout",
    "priority_from_name",
]
