"""Bulkheads: each module's own cap on upstream calls in flight, inside the process cap.

Why: one pool of ``VX11_MAX_INFLIGHT`` slots per process lets a module whose calls are slow
(120 s spawns, 30 s audio analyses) take every slot and starve the others. A module with
``max_concurrent`` set gets a :class:`~gateway.policies.backpressure.PriorityLimiter` of its
own — the same priority queue (health > analysis > other, FIFO within one, bounded, with
deadlines) — and a call takes its module's slot *before* a process slot, releasing in the
reverse order. So a module at its cap queues on its own limiter and holds no process slot
while it waits (Envoy's per-cluster ``max_requests`` / ``max_pending_requests`` work that
way): the others keep the process pool.

One :class:`Bulkheads` per event loop (the registry's ``Services``), keyed by module name,
a limiter created on a module's first capped call and resized in place when the snapshot's
cap changes. A module without a cap has no limiter at all: the request path checks one
attribute (``ModuleInfo.max_concurrent``) and goes on.
"""

from __future__ import annotations

import time

from gateway.core.clock import Clock
from gateway.policies.backpressure import PriorityLimiter


class Bulkheads:
    """The per-module limiters of one event loop; ``queue_max`` waiters per module."""

    def __init__(self, queue_max: int, clock: Clock = time.monotonic, retry_after: float = 1.0):
        if queue_max < 0:
            raise ValueError("queue_max must be >= 0")
        self.queue_max = queue_max
        self.clock = clock
        self.retry_after = retry_after
        self._limiters: dict[str, PriorityLimiter] = {}

    def get(self, module: str, cap: int) -> PriorityLimiter:
        """The module's limiter at ``cap`` (>= 1): made on first use, resized on a change."""
        limiter = self._limiters.get(module)
        if limiter is None:
            limiter = PriorityLimiter(cap, self.queue_max, self.clock, self.retry_after)
            self._limiters[module] = limiter
        elif limiter.max_inflight != cap:
            limiter.resize(cap)
        return limiter

    def peek(self, module: str) -> PriorityLimiter | None:
        """The module's limiter if it has one (no call has made it yet: ``None``)."""
        return self._limiters.get(module)

    def usage(self) -> dict[str, tuple[int, int]]:
        """``{module: (in flight, queued)}`` for every limiter made so far (from any thread:
        a copy of the items is taken first)."""
        return {name: (lim.inflight, lim.queued) for name, lim in list(self._limiters.items())}


__all__ = ["Bulkheads"]
