"""The memory implementation of the state store: per-process state in plain objects.

Used when the gateway runs without Redis and as the fallback while Redis is unreachable.
No ``await`` inside a decision, so every decision is atomic under asyncio (the rate-limit
log also locks itself, for callers on sync threads). Same semantics as
``gateway.state.redis_store``; the contract suites in ``tests/gateway/policies`` run
against both.
"""

from __future__ import annotations

import math
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.state.ejections import (
    ACTIVE_PROBE,
    CONSECUTIVE_FAILURES,
    Ejection,
    OutlierConfig,
    Outliers,
    decayed,
)
from gateway.state.values import (
    ALLOW_CLOSED,
    CLEAN_CLOSED,
    CLOSED,
    HALF_OPEN,
    OPEN,
    WINDOW_BUCKETS,
    BreakerConfig,
    BreakerStatus,
    Decision,
    Permit,
    Scope,
    Transition,
    check_action,
    decide,
    probe_wait,
    report,
    window_reset,
)


def probe_token() -> str:
    """A unique probe id (uniqueness, not secrecy: no syscall per request)."""
    return f"{random.getrandbits(128):032x}"


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
                window_reset(log, s.limit, s.window, now)
                for s, log in zip(scopes, logs, strict=True)
            ]
            return decide(scopes, counts, resets, admits)

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


@dataclass
class _State:
    state: str = CLOSED
    failures: int = 0
    successes: int = 0
    last_failure: float | None = None
    opened_at: float | None = None
    forced: str | None = None
    probes: dict[str, float] = field(default_factory=dict)  # probe id -> lease expiry
    window: dict[int, list[int]] = field(default_factory=dict)  # bucket -> [calls, failures]


class MemoryBreakerBackend:
    """Per-process state in plain dicts; no ``await`` inside a decision, so asyncio-safe."""

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}

    def _get(self, module: str) -> _State:
        state = self._states.get(module)
        if state is None:
            state = self._states[module] = _State()
        return state

    async def acquire(
        self, module: str, cfg: BreakerConfig, now: float
    ) -> tuple[Permit, Transition | None]:
        s = self._get(module)
        if s.forced == OPEN:
            return Permit(False, OPEN, cfg.recovery_timeout, None), None
        if s.forced == CLOSED or s.state == CLOSED:
            return (CLEAN_CLOSED if s.forced is None and s.failures == 0 else ALLOW_CLOSED), None
        transition = None
        if s.state == OPEN:
            reopen_at = (s.opened_at or 0.0) + cfg.recovery_timeout
            if now < reopen_at:
                return Permit(False, OPEN, reopen_at - now, None), None
            s.state, s.successes = HALF_OPEN, 0
            s.probes.clear()
            transition = Transition(module, OPEN, HALF_OPEN, "recovery_timeout", now)
        for probe, expiry in list(s.probes.items()):
            if expiry <= now:
                del s.probes[probe]
        if len(s.probes) < cfg.half_open_max_calls:
            probe_id = probe_token()
            s.probes[probe_id] = now + cfg.probe_lease_seconds
            return Permit(True, HALF_OPEN, 0.0, probe_id), transition
        wait = probe_wait(min(s.probes.values()), now)
        return Permit(False, HALF_OPEN, wait, None), transition

    async def record(
        self, module: str, cfg: BreakerConfig, now: float, *, failure: bool, probe_id: str | None
    ) -> Transition | None:
        s = self._get(module)
        held = probe_id is not None and s.probes.pop(probe_id, None) is not None
        if s.forced == OPEN or (s.forced is None and s.state == OPEN):
            # A late answer to a call admitted before the trip: note it, change nothing.
            if failure:
                s.last_failure = now
            return None
        if failure:
            s.last_failure = now
        if s.forced == CLOSED or s.state == CLOSED:
            s.failures = s.failures + 1 if failure else 0
            if s.forced == CLOSED:
                return None
            if failure and s.failures >= cfg.failure_threshold:
                return self._open(module, s, now, "failure_threshold")
            if cfg.uses_window and self._window_add(s, cfg, now, failure) and failure:
                return self._open(module, s, now, "failure_rate")
            return None
        # half-open: only a result from a probe that still holds its lease counts
        if not held:
            return None
        if failure:
            s.failures += 1
            return self._open(module, s, now, "probe_failed")
        s.successes += 1
        if s.successes < cfg.success_threshold:
            return None
        s.state, s.failures, s.successes, s.opened_at = CLOSED, 0, 0, None
        s.probes.clear()
        s.window.clear()
        return Transition(module, HALF_OPEN, CLOSED, "probe_succeeded", now)

    @staticmethod
    def _window_add(s: _State, cfg: BreakerConfig, now: float, failure: bool) -> bool:
        """Count the call; True when the window's failure rate says trip."""
        assert cfg.window_seconds is not None and cfg.failure_rate_threshold is not None
        bucket = math.floor(now / (cfg.window_seconds / WINDOW_BUCKETS))
        counts = s.window.setdefault(bucket, [0, 0])
        counts[0] += 1
        counts[1] += int(failure)
        calls = fails = 0
        for key in list(s.window):
            if key <= bucket - WINDOW_BUCKETS:
                del s.window[key]
            else:
                calls += s.window[key][0]
                fails += s.window[key][1]
        return calls >= cfg.min_calls and fails / calls >= cfg.failure_rate_threshold

    @staticmethod
    def _open(module: str, s: _State, now: float, reason: str) -> Transition:
        before = s.state
        s.state, s.opened_at, s.successes = OPEN, now, 0
        s.probes.clear()
        s.window.clear()
        return Transition(module, before, OPEN, reason, now)

    async def status(self, module: str, cfg: BreakerConfig, now: float) -> BreakerStatus:
        s = self._states.get(module) or _State()
        return report(s.state, s.failures, s.last_failure, s.opened_at, s.forced, cfg, now)

    async def statuses(
        self, modules: list[str], cfg_for: Callable[[str], BreakerConfig], now: float
    ) -> dict[str, BreakerStatus]:
        return {m: await self.status(m, cfg_for(m), now) for m in modules}

    async def force(self, module: str, action: str, now: float) -> Transition | None:
        check_action(action)
        s = self._get(module)
        before = s.forced or s.state
        if action == "reset":
            self._states[module] = _State()
            after = CLOSED
        elif action == "force_open":
            s.forced = after = OPEN
        elif action == "force_closed":
            s.forced = after = CLOSED
        else:
            s.forced, after = None, s.state
        return None if before == after else Transition(module, before, after, action, now)

    async def mark_healthy(self, module: str, cfg: BreakerConfig, now: float) -> Transition | None:
        s = self._states.get(module)
        if s is None or s.forced is not None or s.state != OPEN:
            return None
        s.state, s.successes = HALF_OPEN, 0
        s.probes.clear()
        return Transition(module, OPEN, HALF_OPEN, "health_check", now)

    async def release(self, module: str, probe_id: str) -> None:
        s = self._states.get(module)
        if s is not None:
            s.probes.pop(probe_id, None)


class MemoryAdmission:
    """The combined admission over memory: the rate limit; the breaker is left to its own
    ``acquire`` (two in-process calls cost no round trip, so nothing is peeked)."""

    def __init__(self, limits: MemoryRateLimitBackend) -> None:
        self.limits = limits

    async def admit(
        self,
        scopes: Sequence[Scope],
        now: float,
        module: str,
        cfg: BreakerConfig,
        breaker_now: float,
        *,
        shadow: bool,
    ) -> tuple[Decision, Permit | None]:
        return await self.limits.hit(scopes, now), None


@dataclass(slots=True)
class _Outlier:
    consecutive: int = 0
    count: int = 0
    since: float = 0.0  # when the current healthy period began (the last ejection's end)
    until: float = 0.0  # the current ejection's end (0: not ejected)


class MemoryOutlierStore:
    """Outlier ejection per process (no Redis, and the fallback during an outage); the
    arithmetic of ``gateway.state.ejections``, as ``lua/outlier_record.lua`` does it."""

    def __init__(self) -> None:
        self._modules: dict[str, dict[str, _Outlier]] = {}
        #: Per module, the targets the health worker found down (``mark_down``).
        self._down: dict[str, set[str]] = {}

    async def record(
        self,
        module: str,
        target: str,
        now: float,
        cfg: OutlierConfig,
        *,
        failure: bool,
        n_targets: int,
        stretch: float,
    ) -> Ejection | None:
        targets = self._modules.setdefault(module, {})
        s = targets.get(target)
        if s is None:
            if not failure:
                return None
            s = targets[target] = _Outlier()
        if 0 < s.until <= now:
            s.until = 0.0
        s.count, s.since = decayed(s.count, s.since, now, cfg.base_ejection)
        if s.until > now or not failure:  # an ejected target's results change nothing
            if not failure:
                s.consecutive = 0
                if not s.count and not s.until:
                    del targets[target]
            return None
        s.consecutive += 1
        if s.consecutive < cfg.consecutive_failures:
            return None
        ejected = sum(1 for t in targets.values() if t.until > now)
        if not cfg.allows(ejected, n_targets):
            return None
        s.count = min(s.count + 1, cfg.max_count)
        s.until = s.since = now + cfg.duration(s.count, stretch)
        s.consecutive = 0
        return Ejection(module, target, True, s.until, s.count, CONSECUTIVE_FAILURES, now)

    async def return_early(
        self, module: str, target: str, now: float, cfg: OutlierConfig
    ) -> Ejection | None:
        s = self._modules.get(module, {}).get(target)
        if s is None or s.until <= now:
            return None
        s.until, s.since, s.consecutive = 0.0, now, 0
        return Ejection(module, target, False, now, s.count, ACTIVE_PROBE, now)

    async def outliers(self, module: str, now: float, cfg: OutlierConfig) -> Outliers:
        return self.view(module, now, cfg)

    async def mark_down(self, module: str, target: str, down: bool, cfg: OutlierConfig) -> bool:
        marked = self._down.setdefault(module, set())
        if down == (target in marked):
            return False
        if down:
            marked.add(target)
        else:
            marked.discard(target)
        return True

    def view(self, module: str, now: float, cfg: OutlierConfig) -> Outliers:
        """:meth:`outliers` without the await (operators' listings from sync code)."""
        seen = Outliers(down=set(self._down.get(module, ())))
        for target, s in self._modules.get(module, {}).items():
            if s.until > now:
                seen.ejected[target] = s.until
            elif s.consecutive:
                seen.failing[target] = s.consecutive
            count = decayed(s.count, s.since, now, cfg.base_ejection)[0]
            if count:
                seen.ejections[target] = count
        return seen


__all__ = [
    "MemoryAdmission",
    "MemoryBreakerBackend",
    "MemoryOutlierStore",
    "MemoryRateLimitBackend",
    "probe_token",
]
