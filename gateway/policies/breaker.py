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
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio
from redis.exceptions import RedisError

from gateway.core.clock import Clock
from gateway.core.deadline import store_call
from gateway.state.resp import Script, ScriptRunner, script_runner

logger = logging.getLogger(__name__)

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
FORCE_ACTIONS = frozenset({"reset", "force_open", "force_closed", "auto"})
#: A caller refused for want of a probe slot may try again this soon (the probe is likely
#: to finish quickly), or sooner if the earliest lease expires first.
PROBE_RETRY_AFTER = 1.0
#: The failure-rate window is kept as this many buckets (a sliding window at 1/10 grain).
WINDOW_BUCKETS = 10


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 3
    recovery_timeout: float = 60.0
    half_open_max_calls: int = 1
    success_threshold: int = 1
    failure_statuses: frozenset[int] = frozenset({500, 502, 503, 504})
    window_seconds: float | None = None
    failure_rate_threshold: float | None = None
    min_calls: int = 10
    probe_lease_seconds: float = 30.0

    @property
    def uses_window(self) -> bool:
        return bool(self.window_seconds) and self.failure_rate_threshold is not None


def is_failure(cfg: BreakerConfig, status: int | None, error: bool) -> bool:
    """A connect error, a timeout or a failure status counts; a 4xx is the client's fault."""
    if error:
        return True
    if status is None or 400 <= status < 500:
        return False
    return status in cfg.failure_statuses


@dataclass(frozen=True)
class Permit:
    allowed: bool
    state: str
    retry_after: float
    probe_id: str | None = None
    #: Closed, not forced, no failure counted: a success would change nothing, so the
    #: facade skips recording it (one store round trip less per healthy request).
    clean: bool = False


@dataclass(frozen=True)
class Transition:
    module: str
    from_state: str
    to_state: str
    reason: str
    at: float


@dataclass(frozen=True)
class BreakerStatus:
    state: str
    failure_count: int
    last_failure: float | None
    opened_at: float | None
    retry_after: float
    forced: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The SPEC §6 status shape (``forced`` is admin-only detail, left out)."""
        return {
            "state": self.state,
            "failure_count": self.failure_count,
            "last_failure": self.last_failure,
            "opened_at": self.opened_at,
            "retry_after": self.retry_after,
        }


class BreakerBackend(Protocol):
    """Where breaker state lives; every method is one atomic decision."""

    async def acquire(
        self, module: str, cfg: BreakerConfig, now: float
    ) -> tuple[Permit, Transition | None]: ...

    async def record(
        self, module: str, cfg: BreakerConfig, now: float, *, failure: bool, probe_id: str | None
    ) -> Transition | None: ...

    async def status(self, module: str, cfg: BreakerConfig, now: float) -> BreakerStatus: ...

    async def statuses(
        self, modules: list[str], cfg_for: Callable[[str], BreakerConfig], now: float
    ) -> dict[str, BreakerStatus]: ...

    async def force(self, module: str, action: str, now: float) -> Transition | None: ...

    async def mark_healthy(
        self, module: str, cfg: BreakerConfig, now: float
    ) -> Transition | None: ...

    async def release(self, module: str, probe_id: str) -> None: ...


_ALLOW_CLOSED = Permit(True, CLOSED, 0.0, None)
_CLEAN_CLOSED = Permit(True, CLOSED, 0.0, None, clean=True)


def _probe_token() -> str:
    """A unique probe id (uniqueness, not secrecy: no syscall per request)."""
    return f"{random.getrandbits(128):032x}"


def _check_action(action: str) -> None:
    if action not in FORCE_ACTIONS:
        raise ValueError(f"unknown breaker action {action!r}; use one of {sorted(FORCE_ACTIONS)}")


def _probe_wait(earliest_expiry: float, now: float) -> float:
    return max(0.0, min(PROBE_RETRY_AFTER, earliest_expiry - now))


def _report(
    state: str,
    failures: int,
    last_failure: float | None,
    opened_at: float | None,
    forced: str | None,
    cfg: BreakerConfig,
    now: float,
) -> BreakerStatus:
    """The state as seen at ``now``: an open breaker past its timeout reads half-open."""
    if forced == OPEN:
        return BreakerStatus(OPEN, failures, last_failure, opened_at, cfg.recovery_timeout, forced)
    if forced == CLOSED:
        return BreakerStatus(CLOSED, failures, last_failure, opened_at, 0.0, forced)
    retry_after = 0.0
    if state == OPEN:
        remaining = (opened_at or 0.0) + cfg.recovery_timeout - now
        if remaining > 0:
            retry_after = remaining
        else:
            state = HALF_OPEN
    return BreakerStatus(state, failures, last_failure, opened_at, retry_after, None)


# --------------------------------------------------------------------------- memory


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
            return (_CLEAN_CLOSED if s.forced is None and s.failures == 0 else _ALLOW_CLOSED), None
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
            probe_id = _probe_token()
            s.probes[probe_id] = now + cfg.probe_lease_seconds
            return Permit(True, HALF_OPEN, 0.0, probe_id), transition
        wait = _probe_wait(min(s.probes.values()), now)
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
        return _report(s.state, s.failures, s.last_failure, s.opened_at, s.forced, cfg, now)

    async def statuses(
        self, modules: list[str], cfg_for: Callable[[str], BreakerConfig], now: float
    ) -> dict[str, BreakerStatus]:
        return {m: await self.status(m, cfg_for(m), now) for m in modules}

    async def force(self, module: str, action: str, now: float) -> Transition | None:
        _check_action(action)
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


# --------------------------------------------------------------------------- redis

# Hash fields: state, failures, successes, last_failure, opened_at, forced. Times are stored
# as the exact strings Python sent (repr of a float), never re-formatted by Lua.

#: Lua functions shared by the acquire script and the admission script
#: (gateway/policies/admission.py). ``peek`` is the read-only part of acquire: a reply when
#: the breaker is closed (allowed) or open before its recovery time (refused), ``nil`` when
#: a decision needs writes (the open -> half-open move, a probe lease).
ACQUIRE_FUNCTIONS = """
local function breaker_peek(keys, argv)
  local now = tonumber(argv[1])
  local h = redis.call('HMGET', keys[1], 'state', 'opened_at', 'forced', 'failures')
  local state, forced = h[1] or 'closed', h[3]
  if forced == 'open' then return {0, 'open', '', '', ''} end
  if forced == 'closed' or state == 'closed' then
    if not forced and (tonumber(h[4]) or 0) == 0 then return {1, 'closed', '', '', '', 1} end
    return {1, 'closed', '', '', ''}
  end
  if state == 'open' and now < (tonumber(h[2]) or 0) + tonumber(argv[2]) then
    return {0, 'open', h[2] or '0', '', ''}
  end
  return nil
end
local function breaker_acquire(keys, argv)
  local seen = breaker_peek(keys, argv)
  if seen then return seen end
  local moved = ''
  if redis.call('HGET', keys[1], 'state') == 'open' then
    redis.call('HSET', keys[1], 'state', 'half_open', 'successes', 0)
    redis.call('DEL', keys[2])
    moved = 'open'
  end
  redis.call('ZREMRANGEBYSCORE', keys[2], '-inf', argv[1])
  if redis.call('ZCARD', keys[2]) < tonumber(argv[3]) then
    redis.call('ZADD', keys[2], argv[5], argv[4])
    return {1, 'half_open', '', '', moved}
  end
  local first = redis.call('ZRANGE', keys[2], 0, 0, 'WITHSCORES')
  return {0, 'half_open', '', first[2], moved}
end
"""

_ACQUIRE = Script(ACQUIRE_FUNCTIONS + "return breaker_acquire(KEYS, ARGV)\n")

_RECORD = Script("""
local failure = ARGV[2] == '1'
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'successes', 'forced')
local state, forced = h[1] or 'closed', h[4]
local failures, successes = tonumber(h[2]) or 0, tonumber(h[3]) or 0
local held = 0
if ARGV[3] ~= '' then held = redis.call('ZREM', KEYS[2], ARGV[3]) end
local function open(reason)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1], 'successes', 0)
  redis.call('DEL', KEYS[2], KEYS[3])
  return {state, 'open', reason}
end
if forced == 'open' or (not forced and state == 'open') then
  if failure then redis.call('HSET', KEYS[1], 'last_failure', ARGV[1]) end
  return {}
end
if failure then redis.call('HSET', KEYS[1], 'last_failure', ARGV[1]) end
if forced == 'closed' or state == 'closed' then
  if failure then failures = failures + 1 else failures = 0 end
  redis.call('HSET', KEYS[1], 'failures', failures)
  if forced then return {} end
  if failure and failures >= tonumber(ARGV[4]) then return open('failure_threshold') end
  local width = tonumber(ARGV[6])
  if width > 0 then
    local bucket = math.floor(tonumber(ARGV[1]) / width)
    redis.call('HINCRBY', KEYS[3], 'c:' .. bucket, 1)
    if failure then redis.call('HINCRBY', KEYS[3], 'f:' .. bucket, 1) end
    local calls, fails = 0, 0
    local all = redis.call('HGETALL', KEYS[3])
    for i = 1, #all, 2 do
      local b = tonumber(string.sub(all[i], 3))
      if b <= bucket - tonumber(ARGV[9]) then
        redis.call('HDEL', KEYS[3], all[i])
      elseif string.sub(all[i], 1, 1) == 'c' then
        calls = calls + tonumber(all[i + 1])
      else
        fails = fails + tonumber(all[i + 1])
      end
    end
    if failure and calls >= tonumber(ARGV[8]) and fails / calls >= tonumber(ARGV[7]) then
      return open('failure_rate')
    end
  end
  return {}
end
if held == 0 then return {} end
if failure then
  redis.call('HSET', KEYS[1], 'failures', failures + 1)
  return open('probe_failed')
end
successes = successes + 1
if successes < tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'successes', successes)
  return {}
end
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'successes', 0)
redis.call('HDEL', KEYS[1], 'opened_at')
redis.call('DEL', KEYS[2], KEYS[3])
return {'half_open', 'closed', 'probe_succeeded'}
""")

_FORCE = Script("""
local h = redis.call('HMGET', KEYS[1], 'state', 'forced')
local state = h[1] or 'closed'
local before, after = h[2] or state, state
if ARGV[1] == 'reset' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  after = 'closed'
elseif ARGV[1] == 'force_open' then
  redis.call('HSET', KEYS[1], 'forced', 'open')
  after = 'open'
elseif ARGV[1] == 'force_closed' then
  redis.call('HSET', KEYS[1], 'forced', 'closed')
  after = 'closed'
else
  redis.call('HDEL', KEYS[1], 'forced')
end
return {before, after}
""")

_HEALTHY = Script("""
local h = redis.call('HMGET', KEYS[1], 'state', 'forced')
if h[2] or h[1] ~= 'open' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'successes', 0)
redis.call('DEL', KEYS[2])
return 1
""")

_RELEASE = Script("return redis.call('ZREM', KEYS[1], ARGV[1])")

_STATUS_FIELDS = ("state", "failures", "last_failure", "opened_at", "forced")


def _text(value: Any) -> str:
    """Script replies are bytes unless the client decodes responses."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _num(value: Any) -> float | None:
    text = _text(value)
    return float(text) if text else None


class RedisBreakerBackend:
    """State in Redis, shared by every process and host; one script call per decision."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        prefix: str = "vx11:cb:",
        *,
        scripts: ScriptRunner | None = None,
    ) -> None:
        """``scripts``: where the decision scripts run (default: through ``client``).

        The gateway passes its pipelined request-path connection (``gateway.state.resp``);
        status reads stay on ``client``.
        """
        self.client = client
        self.prefix = prefix
        self.scripts = script_runner(client) if scripts is None else scripts

    def _keys(self, module: str) -> list[str]:
        base = self.prefix + module
        return [base, base + ":probes", base + ":window"]

    def acquire_call(
        self, module: str, cfg: BreakerConfig, now: float
    ) -> tuple[list[str], list[str | int], str]:
        """Keys, arguments and probe id of one acquire (also run inside the admission script)."""
        probe_id = _probe_token()
        args: list[str | int] = [
            repr(now),
            repr(cfg.recovery_timeout),
            cfg.half_open_max_calls,
            probe_id,
            repr(now + cfg.probe_lease_seconds),
        ]
        return self._keys(module)[:2], args, probe_id

    def peek_call(self, module: str, cfg: BreakerConfig, now: float) -> tuple[list[str], list[str]]:
        """Keys and arguments of the read-only ``breaker_peek`` (the admission script)."""
        return self._keys(module)[:2], [repr(now), repr(cfg.recovery_timeout)]

    @staticmethod
    def acquire_reply(
        reply: list[Any], module: str, cfg: BreakerConfig, now: float, probe_id: str
    ) -> tuple[Permit, Transition | None]:
        """The permit an acquire (or peek) reply stands for."""
        allowed, state, opened_at, earliest, moved = reply[:5]
        state = _text(state)
        transition = None
        if _text(moved):
            transition = Transition(module, OPEN, HALF_OPEN, "recovery_timeout", now)
        if int(allowed):
            if state == CLOSED:
                return (_CLEAN_CLOSED if len(reply) > 5 else _ALLOW_CLOSED), None
            return Permit(True, HALF_OPEN, 0.0, probe_id), transition
        if state == HALF_OPEN:
            wait = _probe_wait(float(_text(earliest)), now)
            return Permit(False, HALF_OPEN, wait, None), transition
        opened = _num(opened_at)
        wait = cfg.recovery_timeout if opened is None else opened + cfg.recovery_timeout - now
        return Permit(False, OPEN, wait, None), None

    async def acquire(
        self, module: str, cfg: BreakerConfig, now: float
    ) -> tuple[Permit, Transition | None]:
        keys, args, probe_id = self.acquire_call(module, cfg, now)
        reply = await self.scripts.run_script(_ACQUIRE, keys, args)
        return self.acquire_reply(reply, module, cfg, now, probe_id)

    async def record(
        self, module: str, cfg: BreakerConfig, now: float, *, failure: bool, probe_id: str | None
    ) -> Transition | None:
        width = (cfg.window_seconds or 0.0) / WINDOW_BUCKETS if cfg.uses_window else 0.0
        args: list[str | int] = [
            repr(now),
            "1" if failure else "0",
            probe_id or "",
            cfg.failure_threshold,
            cfg.success_threshold,
            repr(width),
            repr(cfg.failure_rate_threshold or 0.0),
            cfg.min_calls,
            WINDOW_BUCKETS,
        ]
        reply = await self.scripts.run_script(_RECORD, self._keys(module), args)
        if not reply:
            return None
        before, after, reason = (_text(v) for v in reply)
        return Transition(module, before, after, reason, now)

    def _parse(self, values: list[Any], cfg: BreakerConfig, now: float) -> BreakerStatus:
        state, failures, last_failure, opened_at, forced = (_text(v) for v in values)
        return _report(
            state or CLOSED,
            int(failures or 0),
            _num(last_failure),
            _num(opened_at),
            forced or None,
            cfg,
            now,
        )

    async def status(self, module: str, cfg: BreakerConfig, now: float) -> BreakerStatus:
        values = await self.client.hmget(self.prefix + module, list(_STATUS_FIELDS))
        return self._parse(values, cfg, now)

    async def statuses(
        self, modules: list[str], cfg_for: Callable[[str], BreakerConfig], now: float
    ) -> dict[str, BreakerStatus]:
        pipe = self.client.pipeline(transaction=False)
        for module in modules:
            pipe.hmget(self.prefix + module, list(_STATUS_FIELDS))
        rows = await pipe.execute()
        return {m: self._parse(row, cfg_for(m), now) for m, row in zip(modules, rows, strict=True)}

    async def force(self, module: str, action: str, now: float) -> Transition | None:
        _check_action(action)
        before, after = (
            _text(v) for v in await self.scripts.run_script(_FORCE, self._keys(module), [action])
        )
        return None if before == after else Transition(module, before, after, action, now)

    async def mark_healthy(self, module: str, cfg: BreakerConfig, now: float) -> Transition | None:
        moved = await self.scripts.run_script(_HEALTHY, self._keys(module)[:2], [])
        return Transition(module, OPEN, HALF_OPEN, "health_check", now) if int(moved) else None

    async def release(self, module: str, probe_id: str) -> None:
        await self.scripts.run_script(_RELEASE, self._keys(module)[1:2], [probe_id])


# --------------------------------------------------------------------------- fallback


class FallbackBreakerBackend:
    """Redis first, memory when Redis is slow or down; a dead Redis never stalls a request.

    After a failure the primary is left alone for ``retry_interval`` seconds (measured on
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
        self.primary = primary
        self.fallback = fallback
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.clock = clock
        self.degraded = False
        self._retry_at = 0.0

    async def _call[T](self, op: Callable[[BreakerBackend], Awaitable[T]]) -> T:
        if self.degraded:
            if self.clock() < self._retry_at:
                return await op(self.fallback)
            # One caller probes Redis; the others keep to memory until it answers.
            self._retry_at = self.clock() + self.retry_interval
        try:
            # Time our own loop spends stalled (a burst, a GC pause) is not charged to
            # Redis: see gateway/core/deadline.py.
            result = await store_call(lambda: op(self.primary), self.timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            self.mark_unavailable(exc)
            return await op(self.fallback)
        if self.degraded:
            logger.info("breaker store is back")
            self.degraded = False
        return result

    def mark_unavailable(self, exc: BaseException) -> None:
        """The store failed (here or in a combined call elsewhere): use memory for a while."""
        if not self.degraded:
            logger.warning("breaker store unavailable, using in-process state: %r", exc)
        self.degraded = True
        self._retry_at = self.clock() + self.retry_interval

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
        _check_action(action)
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

    def emit(self, transition: Transition | None) -> None:
        if transition is None or self.on_transition is None:
            return
        try:
            self.on_transition(transition)
        except Exception:  # a broken hook must not fail the request it rides on
            logger.exception("on_transition hook failed for %s", transition)

    async def acquire(self, module: str) -> Permit:
        if not self.enabled:
            return _ALLOW_CLOSED
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
