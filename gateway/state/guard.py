"""The one guard every policy puts in front of the shared store.

Each store call gets ``timeout`` seconds (time our own loop spends stalled is not
charged: ``gateway.core.deadline.store_call``). After a failure the store is left alone
for ``retry_interval`` seconds (monotonic clock): during an outage callers answer from
their fallback at once instead of each paying a timeout; then one caller probes the store
while the others keep to the fallback. ``degraded`` is True from a failure until the
store answers again. What the fallback *is* stays the policy's business (the rate
limiter's ``fail_mode``, the breaker's in-process state, the cache's fetch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from gateway.core.deadline import store_call

Clock = Callable[[], float]

#: What a store call may raise when the store is unreachable or slow.
STORE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, RedisError, OSError)


class StoreUnavailable(Exception):
    """The shared store failed, timed out, or is still in its retry back-off."""


class StoreGuard:
    """Bounds every store call and remembers an outage, so the store never stalls a request.

    ``log`` and ``label``: when given, the guard logs the first failure of an outage
    (warning) and the store's return (info) as ``"<label> unavailable, using in-process
    state: <error>"`` / ``"<label> is back"``.
    """

    __slots__ = ("_monotonic", "_retry_at", "degraded", "label", "log", "retry_interval", "timeout")

    def __init__(
        self,
        *,
        timeout: float,
        retry_interval: float = 1.0,
        monotonic: Clock = time.monotonic,
        log: logging.Logger | None = None,
        label: str = "store",
    ) -> None:
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._monotonic = monotonic
        self._retry_at = 0.0
        self.degraded = False
        self.log = log
        self.label = label

    async def call[T](self, factory: Callable[[], Awaitable[T]]) -> T:
        """Run one store call, or raise StoreUnavailable without touching the store."""
        if self.degraded:
            now = self._monotonic()
            if now < self._retry_at:
                raise StoreUnavailable("store in retry back-off")
            # One caller probes the store; the others keep to the fallback meanwhile
            # (else every request arriving during the probe would wait a timeout too).
            self._retry_at = now + self.retry_interval
        try:
            result = await store_call(factory, self.timeout)  # loop stalls not charged
        except STORE_ERRORS as exc:
            self.mark_unavailable(exc)
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        if self.degraded:
            if self.log is not None:
                self.log.info("%s is back", self.label)
            self.degraded = False
        return result

    def mark_unavailable(self, exc: BaseException) -> None:
        """The store failed (here or in a combined call elsewhere): back off for a while."""
        if not self.degraded and self.log is not None:
            self.log.warning("%s unavailable, using in-process state: %r", self.label, exc)
        self.degraded = True
        self._retry_at = self._monotonic() + self.retry_interval


class Guarded[S]:
    """A shared store with a per-process fallback behind one :class:`StoreGuard`: each
    operation runs on ``primary`` while it answers in time, on ``fallback`` otherwise (the
    breaker backend and the outlier store build on this)."""

    def __init__(
        self,
        primary: S,
        fallback: S,
        *,
        label: str,
        log: logging.Logger,
        timeout: float = 0.05,
        retry_interval: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.guard = StoreGuard(
            timeout=timeout, retry_interval=retry_interval, monotonic=clock, log=log, label=label
        )

    @property
    def degraded(self) -> bool:
        """True from a store failure until the store answers again."""
        return self.guard.degraded

    async def _call[T](self, op: Callable[[S], Awaitable[T]]) -> T:
        try:
            return await self.guard.call(lambda: op(self.primary))
        except StoreUnavailable:
            return await op(self.fallback)


__all__ = ["STORE_ERRORS", "Clock", "Guarded", "StoreGuard", "StoreUnavailable"]
