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
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import redis.asyncio
from redis.exceptions import RedisError

from gateway.core.deadline import store_call
from gateway.state.resp import Script, ScriptRunner, script_runner

Clock = Callable[[], float]
FailMode = Literal["local", "open", "closed"]
T = TypeVar("T")

#: What a store call may raise when the store is unreachable or slow.
STORE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, RedisError, OSError)


class Scope(NamedTuple):
    """One limit that applies to a request (``name`` is what the 429 reports)."""

    name: str  # "token" | "ip" | "protected"
    key: str  # e.g. "token:<client-id>", "ip:1.2.3.4", "protected:<client-id>"
    limit: int
    window: int  # seconds


class ScopeResult(NamedTuple):
    """Usage of one scope after a decision.

    ``remaining``: requests this scope would still admit now (after this request
    was counted, if it was admitted; 0 when full).

    ``reset``: seconds until ``remaining`` next goes up, i.e. until the window
    frees a slot: the time the oldest counted request leaves the window (when the
    scope is over its limit, e.g. after the limit was lowered, the entry whose
    departure brings the count below the limit). 0 when nothing is counted. For
    a full scope it is exactly how long a new request has to wait.
    """

    scope: Scope
    remaining: int
    reset: float


class Decision(NamedTuple):
    """The answer for one request over all its scopes.

    ``would_refuse`` is the limiter's verdict whatever the enforcement: True
    whenever the limits refuse the request, also in shadow mode where ``allowed``
    stays True, so callers can count "would have been limited" in one place.
    """

    allowed: bool
    results: tuple[ScopeResult, ...]
    refused_by: Scope | None  # the first refusing scope, in the order given
    retry_after: float  # seconds; 0 when allowed
    degraded: bool = False  # answered without the shared store
    would_refuse: bool = False

    def most_restrictive(self) -> ScopeResult:
        """The scope the headers report: the refusing one, else the least remaining.

        Ties on ``remaining`` go to the longest ``reset`` because that is the
        scope the client will wait on longest.
        """
        if not self.results:
            raise ValueError("a decision without scopes has no most restrictive scope")
        if self.refused_by is not None:
            for result in self.results:
                if result.scope == self.refused_by:
                    return result
        return min(self.results, key=lambda r: (r.remaining, -r.reset))


class RateLimitBackend(Protocol):
    """Where the log lives. One call decides all scopes of a request atomically."""

    async def hit(
        self, scopes: Sequence[Scope], now: float, *, cost_only_if_all_allowed: bool = True
    ) -> Decision: ...

    async def peek(self, scopes: Sequence[Scope], now: float) -> Decision: ...


def _decide(
    scopes: Sequence[Scope], counts: Sequence[int], resets: Sequence[float], admits: Sequence[bool]
) -> Decision:
    """Build a Decision from per-scope counts; shared so both backends answer alike."""
    results = tuple(
        ScopeResult(scope=s, remaining=max(s.limit - c, 0), reset=r)
        for s, c, r in zip(scopes, counts, resets, strict=True)
    )
    refused = [res for res, ok in zip(results, admits, strict=True) if not ok]
    if not refused:
        return Decision(allowed=True, results=results, refused_by=None, retry_after=0.0)
    return Decision(
        allowed=False,
        results=results,
        refused_by=refused[0].scope,
        # Every refusing scope must free a slot before a retry can pass.
        retry_after=max(res.reset for res in refused),
        would_refuse=True,
    )


def _reset(entries: Sequence[float] | deque[float], limit: int, window: int, now: float) -> float:
    """Seconds until the entry whose expiry raises ``remaining`` leaves the window."""
    count = len(entries)
    if count == 0:
        return 0.0
    k = max(count - limit + 1, 1)  # 1-based index of the entry that frees a slot
    return max(entries[k - 1] + window - now, 0.0)


class MemoryRateLimitBackend:
    """The same sliding-window log, per process (deques of admission times).

    Used when the gateway runs without Redis and as the ``local`` fallback during
    a store outage. A decision runs without awaiting, so it is atomic under
    asyncio; the threading lock makes it safe from sync threads too.
    """

    _SWEEP_EVERY = 1024

    def __init__(self) -> None:
        self._logs: dict[str, tuple[deque[float], int]] = {}
        self._lock = threading.Lock()
        self._calls = 0

    def _prune(self, scope: Scope, now: float) -> deque[float]:
        entry = self._logs.get(scope.key)
        log = entry[0] if entry is not None else deque()
        cutoff = now - scope.window
        while log and log[0] <= cutoff:
            log.popleft()
        return log

    def _sweep(self, now: float) -> None:
        """Drop keys whose newest entry has expired, so idle clients cost nothing."""
        stale = [k for k, (log, w) in self._logs.items() if not log or log[-1] <= now - w]
        for key in stale:
            del self._logs[key]

    def _run(
        self, scopes: Sequence[Scope], now: float, *, consume: bool, all_or_nothing: bool
    ) -> Decision:
        with self._lock:
            self._calls += 1
            if self._calls % self._SWEEP_EVERY == 0:
                self._sweep(now)
            logs = [self._prune(s, now) for s in scopes]
            admits = [len(log) < s.limit for s, log in zip(scopes, logs, strict=True)]
            if consume:
                for s, log, ok in zip(scopes, logs, admits, strict=True):
                    if ok and (all(admits) or not all_or_nothing):
                        log.append(now)
                        self._logs[s.key] = (log, s.window)
            counts = [len(log) for log in logs]
            resets = [
                _reset(log, s.limit, s.window, now) for s, log in zip(scopes, logs, strict=True)
            ]
            return _decide(scopes, counts, resets, admits)

    async def hit(
        self, scopes: Sequence[Scope], now: float, *, cost_only_if_all_allowed: bool = True
    ) -> Decision:
        """Admit if every scope has room; record the request in each scope.

        With ``cost_only_if_all_allowed`` (the default) a refused request consumes
        nothing anywhere; without it, each scope that had room is charged anyway.
        """
        return self._run(scopes, now, consume=True, all_or_nothing=cost_only_if_all_allowed)

    async def peek(self, scopes: Sequence[Scope], now: float) -> Decision:
        """Current usage, recording nothing (for the status endpoint)."""
        return self._run(scopes, now, consume=False, all_or_nothing=True)


# KEYS: one sorted set per scope. ARGV: now, member, mode, then per scope
# (limit, cutoff, window_ms). mode: 0 peek, 1 all-or-nothing, 2 charge each admitting scope.
# Scores and cutoffs arrive as strings formatted by Python's repr (exact round trip);
# the script never formats a float itself (Lua's tostring keeps only 14 digits).
# Returns {admit_1, count_1, score_1, admit_2, ...}: score_k is the entry whose expiry
# frees a slot ('' when the set is empty); Python computes reset = score + window - now.
RATE_LIMIT_FUNCTION = """
local function rate_limit(keys, argv)
  local now = argv[1]
  local member = argv[2]
  local mode = tonumber(argv[3])
  local n = #keys
  local limits, windows, counts, admits = {}, {}, {}, {}
  local all_ok = true
  for i = 1, n do
    local base = 3 + (i - 1) * 3
    limits[i] = tonumber(argv[base + 1])
    windows[i] = argv[base + 3]
    redis.call('ZREMRANGEBYSCORE', keys[i], '-inf', argv[base + 2])
    counts[i] = redis.call('ZCARD', keys[i])
    admits[i] = counts[i] < limits[i]
    if not admits[i] then all_ok = false end
  end
  if mode > 0 then
    for i = 1, n do
      if admits[i] and (all_ok or mode == 2) then
        redis.call('ZADD', keys[i], now, member)
        redis.call('PEXPIRE', keys[i], windows[i])
        counts[i] = counts[i] + 1
      end
    end
  end
  local out = {}
  for i = 1, n do
    local score = ''
    if counts[i] > 0 then
      local k = counts[i] - limits[i]
      if k < 0 then k = 0 end
      score = redis.call('ZRANGE', keys[i], k, k, 'WITHSCORES')[2]
    end
    out[#out + 1] = admits[i] and 1 or 0
    out[#out + 1] = counts[i]
    out[#out + 1] = score
  end
  return out
end
"""
_LUA_HIT = RATE_LIMIT_FUNCTION + "return rate_limit(KEYS, ARGV)\n"


_HIT_SCRIPT = Script(_LUA_HIT)


def _member_suffix() -> str:
    """Makes a log entry unique among requests admitted at the same instant.

    Uniqueness, not secrecy: Python's PRNG (no ``os.urandom`` syscall per request).
    """
    return f"{random.getrandbits(64):016x}"


class RedisRateLimitBackend:
    """The sliding-window log in Redis: one Lua script, one round trip per request.

    All scopes of a request are checked and charged inside one script, so the
    decision is atomic across every process and host sharing the server. (On a
    Redis Cluster the scope keys would need one hash slot; the gateway uses a
    single primary.)
    """

    def __init__(
        self, client: redis.asyncio.Redis | ScriptRunner, prefix: str = "vx11:rl:"
    ) -> None:
        self.runner = script_runner(client)
        self._prefix = prefix

    def script_call(
        self, scopes: Sequence[Scope], now: float, mode: int
    ) -> tuple[list[str], list[str | int]]:
        """Keys and arguments of one decision (also run inside the admission script)."""
        args: list[str | int] = [repr(now), f"{now!r}:{_member_suffix()}", mode]
        for s in scopes:
            args += [s.limit, repr(now - s.window), max(math.ceil(s.window * 1000), 1)]
        return [self._prefix + s.key for s in scopes], args

    @staticmethod
    def decision(scopes: Sequence[Scope], now: float, raw: Sequence[Any]) -> Decision:
        """The decision a script reply stands for."""
        admits: list[bool] = []
        counts: list[int] = []
        resets: list[float] = []
        for i, s in enumerate(scopes):
            admit, count, score = raw[3 * i], raw[3 * i + 1], raw[3 * i + 2]
            admits.append(int(admit) == 1)
            counts.append(int(count))
            resets.append(max(float(score) + s.window - now, 0.0) if score else 0.0)
        return _decide(scopes, counts, resets, admits)

    async def _run(self, scopes: Sequence[Scope], now: float, mode: int) -> Decision:
        if not scopes:
            return _decide((), (), (), ())
        keys, args = self.script_call(scopes, now, mode)
        raw = await self.runner.run_script(_HIT_SCRIPT, keys, args)
        return self.decision(scopes, now, raw)

    async def hit(
        self, scopes: Sequence[Scope], now: float, *, cost_only_if_all_allowed: bool = True
    ) -> Decision:
        """See :meth:`MemoryRateLimitBackend.hit`; same algorithm, shared state."""
        return await self._run(scopes, now, 1 if cost_only_if_all_allowed else 2)

    async def peek(self, scopes: Sequence[Scope], now: float) -> Decision:
        """Current usage, recording nothing (expired entries are pruned though)."""
        return await self._run(scopes, now, 0)


class StoreUnavailable(Exception):
    """The shared store failed, timed out, or is still in its retry back-off."""


class StoreGuard:
    """Bounds every store call and remembers an outage, so Redis never stalls a request.

    Each call gets ``timeout`` seconds. After a failure the store is not tried
    again for ``retry_interval`` seconds (monotonic clock): during an outage
    requests answer from the fallback at once instead of each paying a timeout.
    """

    def __init__(
        self, *, timeout: float, retry_interval: float, monotonic: Clock = time.monotonic
    ) -> None:
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._monotonic = monotonic
        self._retry_at = 0.0
        self.degraded = False

    async def call(self, factory: Callable[[], Awaitable[T]]) -> T:
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
            self.degraded = True
            self._retry_at = self._monotonic() + self.retry_interval
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        self.degraded = False
        return result


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
