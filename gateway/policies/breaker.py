"""Circuit breakers, one per module, with state shared across processes and hosts.

::

                  failure_threshold consecutive failures, or a failure
    +--------+    rate >= threshold over the window (>= min_calls calls)    +------+
    | closed | -----------------------------------------------------------> | open |
    +--------+                                                              +------+
        ^                                                                    |   ^
        | success_threshold                          recovery_timeout        |   |
        | probe successes                            elapsed, or a passing   |   | a probe
        |                                            health check            |   | fails
        |                      +-----------+ <-------------------------------+   |
        +--------------------- | half_open | ------------------------------------+
                               +-----------+
                 at most half_open_max_calls leased probes, across all processes

    Operator overrides sit on top: force_open refuses everything, force_closed admits
    everything and never trips, auto lifts the override, reset starts over closed.

Why it is built this way:

- Time is wall-clock epoch seconds from an injected clock, because the state is shared by
  hosts; the Redis scripts take ``now`` as an argument, so tests drive real Redis with a
  ``FakeClock``.
- Every decision is one atomic step: a Lua script in Redis (one round trip), a block of plain
  Python without ``await`` in memory. Half-open slots are leases in a sorted set scored by
  expiry, so a probe holder that dies frees its slot after ``probe_lease_seconds``.
- The stored state is what transitions describe; the *reported* state is computed when read
  (an open breaker past its timeout reads ``half_open`` before anyone has moved it).
- ``FallbackBreakerBackend`` answers from memory when Redis is slow or gone, so a Redis outage
  degrades sharing instead of stalling requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway.core.clock import Clock
from gateway.state.base import BreakerStore
from gateway.state.guard import Guarded, StoreGuard
from gateway.state.memory import MemoryBreakerBackend
from gateway.state.redis_store import RedisBreakerBackend
from gateway.state.values import (
    ALLOW_CLOSED,
    CLOSED,
    FORCE_ACTIONS,
    HALF_OPEN,
    OPEN,
    PROBE_RETRY_AFTER,
    WINDOW_BUCKETS,
    BreakerConfig,
    BreakerStatus,
    Permit,
    Transition,
    check_action,
)

logger = logging.getLogger(__name__)

#: Where breaker state lives (``gateway.state.base``; memory and Redis implementations).
BreakerBackend = BreakerStore
#: The Lua functions shared by the acquire and admission scripts (``gateway/state/lua``).


def is_failure(cfg: BreakerConfig, status: int | None, error: bool) -> bool:
    """A connect error, a timeout or a failure status counts; a 4xx is the client's fault."""
    if error:
        return True
    if status is None or 400 <= status < 500:
        return False
    return status in cfg.failure_statuses


# --------------------------------------------------------------------------- fallback


class FallbackBreakerBackend(Guarded[BreakerBackend]):
    """The shared store first, memory when it is slow or down; a dead Redis never stalls a
    request.

    Store calls go through the one store guard (``gateway.state.guard.StoreGuard``): after a
    failure the primary is left alone for ``retry_interval`` seconds (measured on
    ``clock``, a monotonic clock unrelated to the breakers' wall clock). While degraded each
    process keeps its own breakers, starting from closed.
    """

    def __init__(
        self,
        primary: BreakerBackend,
        fallback: MemoryBreakerBackend,
        timeout: float = 0.05,
        retry_interval: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            primary,
            fallback,
            label="breaker store",
            log=logger,
            timeout=timeout,
            retry_interval=retry_interval,
            clock=clock,
        )

    @property
    def timeout(self) -> float:
        return self.guard.timeout

    def mark_unavailable(self, exc: BaseException) -> None:
        """The store failed (here or in a combined call elsewhere): use memory for a while."""
        self.guard.mark_unavailable(exc)

    async def acquire(
        self, module: str, cfg: BreakerConfig, now: float
    ) -> tuple[Permit, Transition | None]:
        return await self._call(lambda b: b.acquire(module, cfg, now))

    async def record(
        self, module: str, cfg: BreakerConfig, now: float, *, failure: bool, probe_id: str | None
    ) -> Transition | None:
        return await self._call(
            lambda b: b.record(module, cfg, now, failure=failure, probe_id=probe_id)
        )

    async def status(self, module: str, cfg: BreakerConfig, now: float) -> BreakerStatus:
        return await self._call(lambda b: b.status(module, cfg, now))

    async def statuses(
        self, modules: list[str], cfg_for: Callable[[str], BreakerConfig], now: float
    ) -> dict[str, BreakerStatus]:
        return await self._call(lambda b: b.statuses(modules, cfg_for, now))

    async def force(self, module: str, action: str, now: float) -> Transition | None:
        check_action(action)
        return await self._call(lambda b: b.force(module, action, now))

    async def mark_healthy(self, module: str, cfg: BreakerConfig, now: float) -> Transition | None:
        return await self._call(lambda b: b.mark_healthy(module, cfg, now))

    async def release(self, module: str, probe_id: str) -> None:
        await self._call(lambda b: b.release(module, probe_id))


# --------------------------------------------------------------------------- facade


class CircuitBreaker:
    """What the request path calls: picks the config, reads the clock, reports transitions."""

    def __init__(
        self,
        backend: BreakerBackend,
        config_for: Callable[[str], BreakerConfig],
        clock: Clock = time.time,
        on_transition: Callable[[Transition], None] | None = None,
        enabled: bool = True,
    ) -> None:
        self.backend = backend
        self.config_for = config_for
        self.clock = clock
        self.on_transition = on_transition
        self.enabled = enabled

    @property
    def store(self) -> BreakerBackend:
        """The store decisions go to while it answers (the shared one behind a fallback)."""
        backend = self.backend
        return backend.primary if isinstance(backend, FallbackBreakerBackend) else backend

    @property
    def guard(self) -> StoreGuard | None:
        """The guard of :attr:`store` (None: in-process state, nothing to guard)."""
        backend = self.backend
        return backend.guard if isinstance(backend, FallbackBreakerBackend) else None

    def emit(self, transition: Transition | None) -> None:
        if transition is None or self.on_transition is None:
            return
        try:
            self.on_transition(transition)
        except Exception:  # a broken hook must not fail the request it rides on
            logger.exception("on_transition hook failed for %s", transition)

    async def acquire(self, module: str) -> Permit:
        if not self.enabled:
            return ALLOW_CLOSED
        permit, transition = await self.backend.acquire(
            module, self.config_for(module), self.clock()
        )
        self.emit(transition)
        return permit

    async def record(
        self,
        module: str,
        *,
        status: int | None,
        error: bool,
        probe_id: str | None = None,
        permit: Permit | None = None,
    ) -> None:
        if not self.enabled:
            return
        cfg = self.config_for(module)
        failure = is_failure(cfg, status, error)
        if not failure and permit is not None and permit.clean and not cfg.uses_window:
            return  # a success on a clean closed breaker changes nothing
        self.emit(
            await self.backend.record(module, cfg, self.clock(), failure=failure, probe_id=probe_id)
        )

    async def release(self, module: str, permit: Permit) -> None:
        """Give a permit back without an outcome: the call says nothing about the module
        (the client left, or the request was refused before a byte was sent). A half-open
        probe slot is freed at once instead of when its lease expires."""
        if self.enabled and permit.probe_id:
            await self.backend.release(module, permit.probe_id)

    async def status(self, module: str) -> BreakerStatus:
        return await self.backend.status(module, self.config_for(module), self.clock())

    async def statuses(self, modules: list[str]) -> dict[str, BreakerStatus]:
        return await self.backend.statuses(modules, self.config_for, self.clock())

    async def force(self, module: str, action: str) -> Transition | None:
        transition = await self.backend.force(module, action, self.clock())
        self.emit(transition)
        return transition

    async def mark_healthy(self, module: str) -> Transition | None:
        transition = await self.backend.mark_healthy(module, self.config_for(module), self.clock())
        self.emit(transition)
        return transition


__all__ = [
    "CLOSED",
    "FORCE_ACTIONS",
    "HALF_OPEN",
    "OPEN",
    "PROBE_RETRY_AFTER",
    "WINDOW_BUCKETS",
    "BreakerBackend",
    "BreakerConfig",
    "BreakerStatus",
    "CircuitBreaker",
    "FallbackBreakerBackend",
    "MemoryBreakerBackend",
    "Permit",
    "RedisBreakerBackend",
    "Transition",
    "is_failure",
]
