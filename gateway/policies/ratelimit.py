"""Exact rate limiting: a sliding-window log per scope, shared through Redis.

SPEC §8 asks that across all processes and hosts no more than ``limit`` requests
are admitted in *any* window of ``window`` seconds. Only a log of admission times
gives that guarantee: GCRA and the sliding-window *counter* approximate the
previous window's share, so some windows admit more than the limit (or refuse
too early), and fixed windows admit up to twice the limit across a boundary.

The log costs one sorted-set entry per admitted request per scope (``limit``
entries at most per key), which is cheap at the SPEC's limits (1000/5000/100 per
minute) and buys an exact answer.

Window semantics: a request admitted at ``t`` counts until ``t + window``
(exclusive), i.e. the window ending at ``now`` is ``(now - window, now]``. So no
half-open interval of ``window`` seconds ever contains more than ``limit``
admissions.

Time comes from an injected wall clock (``time.time``): the log is shared across
hosts, so a monotonic clock (per-boot) would be meaningless elsewhere, and the
time is passed *into* the Lua script rather than read from Redis's ``TIME`` so
tests can drive a fake clock against a real server. Hosts must run NTP; a host
whose clock is skewed by ``s`` seconds shifts its own view of the window by ``s``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import Literal

from gateway.state.base import RateLimitStore
from gateway.state.guard import STORE_ERRORS, Clock, StoreGuard, StoreUnavailable
from gateway.state.memory import MemoryRateLimitBackend
from gateway.state.redis_store import RedisRateLimitBackend
from gateway.state.values import Decision, Scope, ScopeResult

FailMode = Literal["local", "open", "closed"]
#: Where the log lives (``gateway.state.base``; memory and Redis implementations).
RateLimitBackend = RateLimitStore
#: The Lua of the rate limit alone and its shared function (``gateway/state/lua``).


class RateLimiter:
    """Decides requests against a backend, surviving store failures per ``fail_mode``.

    ``fail_mode``: ``local`` answers from a per-process log (each process then
    limits on its own, so the cluster may admit up to limit x processes during the
    outage), ``open`` admits, ``closed`` refuses with ``Retry-After: 1``. Every
    fallback decision is marked ``degraded``.

    ``enforce=False`` is shadow mode: the decision is computed exactly as when
    enforcing (a would-be-refused request is not recorded, so the counts match
    what enforcement would see), then returned with ``allowed=True`` and
    ``would_refuse`` telling the caller.
    """

    def __init__(
        self,
        backend: RateLimitBackend,
        *,
        fail_mode: FailMode = "local",
        store_timeout: float = 0.05,
        local_backend: MemoryRateLimitBackend | None = None,
        retry_interval: float = 1.0,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        enforce: bool = True,
    ) -> None:
        if fail_mode not in ("local", "open", "closed"):
            raise ValueError(f"unknown fail_mode {fail_mode!r}")
        self.backend = backend
        self.fail_mode: FailMode = fail_mode
        self.local_backend = local_backend or MemoryRateLimitBackend()
        self.enforce = enforce
        self._clock = clock
        self._guard = StoreGuard(
            timeout=store_timeout, retry_interval=retry_interval, monotonic=monotonic
        )

    @property
    def degraded(self) -> bool:
        """True from a store failure until the store answers again."""
        return self._guard.degraded

    @property
    def guard(self) -> StoreGuard:
        """Bounds and back-off of store calls (shared with the admission step)."""
        return self._guard

    def now(self) -> float:
        return self._clock()

    async def check(self, scopes: Sequence[Scope]) -> Decision:
        """Decide one request over all its scopes, charging them if admitted."""
        now = self._clock()
        try:
            if type(self.backend) is MemoryRateLimitBackend:
                decision = await self.backend.hit(scopes, now)  # nothing to time out
            else:
                decision = await self._guard.call(lambda: self.backend.hit(scopes, now))
        except StoreUnavailable:
            decision = await self.fallback(scopes, now, consume=True)
        return self.enforced(decision)

    def enforced(self, decision: Decision) -> Decision:
        """Shadow mode: a refusal is reported (``would_refuse``) but admitted."""
        if not self.enforce and not decision.allowed:
            return decision._replace(allowed=True, retry_after=0.0, would_refuse=True)
        return decision

    async def status(self, scopes: Sequence[Scope]) -> Decision:
        """Current usage without recording anything (``GET /vx11/rate-limit/status``)."""
        now = self._clock()
        try:
            return await self._guard.call(lambda: self.backend.peek(scopes, now))
        except StoreUnavailable:
            return await self.fallback(scopes, now, consume=False)

    async def fallback(self, scopes: Sequence[Scope], now: float, *, consume: bool) -> Decision:
        """The decision ``fail_mode`` gives while the store is unavailable."""
        if self.fail_mode == "local":
            if consume:
                local = await self.local_backend.hit(scopes, now)
            else:
                local = await self.local_backend.peek(scopes, now)
            return local._replace(degraded=True)
        if self.fail_mode == "open":
            results = tuple(ScopeResult(scope=s, remaining=s.limit, reset=0.0) for s in scopes)
            return Decision(
                allowed=True, results=results, refused_by=None, retry_after=0.0, degraded=True
            )
        results = tuple(ScopeResult(scope=s, remaining=0, reset=1.0) for s in scopes)
        return Decision(
            allowed=not scopes,
            results=results,
            refused_by=scopes[0] if scopes else None,
            retry_after=1.0 if scopes else 0.0,
            degraded=True,
            would_refuse=bool(scopes),
        )


def _ceil_seconds(seconds: float) -> int:
    """Whole seconds, rounding up, ignoring float noise (59.0000000001 is 59)."""
    return max(math.ceil(round(seconds, 6)), 0)


def _sf_string(value: str) -> str:
    """An RFC 8941 sf-string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=1024)
def _policy(scopes: tuple[tuple[str, int, int], ...]) -> str:
    """The ``RateLimit-Policy`` value (a handful of distinct values: cached)."""
    return ", ".join(f"{_sf_string(name)};q={limit};w={window}" for name, limit, window in scopes)


def ratelimit_headers(decision: Decision) -> list[tuple[str, str]]:
    """Response headers for a decision (draft-ietf-httpapi-ratelimit-headers-10 + X-RateLimit-*).

    ``RateLimit-Policy`` lists every scope in order; ``RateLimit`` and the
    ``X-RateLimit-*`` trio describe the most restrictive one; ``Retry-After`` is
    only sent on refusal and is at least 1 so clients never retry in a loop.
    """
    if not decision.results:
        return []
    policy = _policy(tuple((r.scope.name, r.scope.limit, r.scope.window) for r in decision.results))
    top = decision.most_restrictive()
    reset = _ceil_seconds(top.reset)
    headers = [
        ("RateLimit-Policy", policy),
        ("RateLimit", f"{_sf_string(top.scope.name)};r={top.remaining};t={reset}"),
        ("X-RateLimit-Limit", str(top.scope.limit)),
        ("X-RateLimit-Remaining", str(top.remaining)),
        ("X-RateLimit-Reset", str(reset)),
    ]
    if not decision.allowed:
        headers.append(("Retry-After", str(max(_ceil_seconds(decision.retry_after), 1))))
    return headers


__all__ = [
    "STORE_ERRORS",
    "Clock",
    "Decision",
    "FailMode",
    "MemoryRateLimitBackend",
    "RateLimitBackend",
    "RateLimiter",
    "RedisRateLimitBackend",
    "Scope",
    "ScopeResult",
    "StoreGuard",
    "StoreUnavailable",
    "ratelimit_headers",
]
