"""The Redis implementation of the state store: shared by every process and host.

Every decision is one Lua script call (``gateway/state/lua``): the rate-limit log, each
breaker step, and the combined admission (:class:`RedisAdmission`: the rate limit and the
breaker's read-only peek in one round trip). Scripts run through a script runner
(``gateway.state.resp``: the request path's pipelined connection, or a redis-py client);
breaker status reads go through the redis-py client.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio

from gateway.state.memory import probe_token
from gateway.state.resp import Arg, ScriptRunner, script_runner
from gateway.state.scripts import (
    ADMIT,
    BREAKER_ACQUIRE,
    BREAKER_FORCE,
    BREAKER_HEALTHY,
    BREAKER_RECORD,
    BREAKER_RELEASE,
    RATE_LIMIT_HIT,
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
)

_STATUS_FIELDS = ("state", "failures", "last_failure", "opened_at", "forced")


def _member_suffix() -> str:
    """Makes a log entry unique among requests admitted at the same instant.

    Uniqueness, not secrecy: Python's PRNG (no ``os.urandom`` syscall per request).
    """
    return f"{random.getrandbits(64):016x}"


def _text(value: Any) -> str:
    """Script replies are bytes unless the client decodes responses."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _num(value: Any) -> float | None:
    text = _text(value)
    return float(text) if text else None


# --------------------------------------------------------------------------- rate limit


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
        self.prefix = prefix

    def add_call(
        self, scopes: Sequence[Scope], now: float, keys: list[Arg], args: list[Arg]
    ) -> None:
        """Append the scopes' keys and (limit, cutoff, window_ms) triples (``rate_limit.lua``)."""
        prefix = self.prefix
        for s in scopes:
            keys.append(prefix + s.key)
            args += (s.limit, repr(now - s.window), max(math.ceil(s.window * 1000), 1))

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
        return decide(scopes, counts, resets, admits)

    async def _run(self, scopes: Sequence[Scope], now: float, mode: int) -> Decision:
        if not scopes:
            return decide((), (), (), ())
        keys: list[Arg] = []
        args: list[Arg] = [repr(now), f"{now!r}:{_member_suffix()}", mode]
        self.add_call(scopes, now, keys, args)
        raw = await self.runner.run_script(RATE_LIMIT_HIT, keys, args)
        return self.decision(scopes, now, raw)

    async def hit(
        self, scopes: Sequence[Scope], now: float, *, cost_only_if_all_allowed: bool = True
    ) -> Decision:
        """See :meth:`MemoryRateLimitBackend.hit`; same algorithm, shared state."""
        return await self._run(scopes, now, 1 if cost_only_if_all_allowed else 2)

    async def peek(self, scopes: Sequence[Scope], now: float) -> Decision:
        """Current usage, recording nothing (expired entries are pruned though)."""
        return await self._run(scopes, now, 0)


# --------------------------------------------------------------------------- breaker


def acquire_reply(
    reply: list[Any], module: str, cfg: BreakerConfig, now: float, probe_id: str
) -> tuple[Permit, Transition | None]:
    """The permit an acquire (or peek) reply stands for (``breaker.lua``)."""
    allowed, state, opened_at, earliest, moved = reply[:5]
    state = _text(state)
    transition = None
    if _text(moved):
        transition = Transition(module, OPEN, HALF_OPEN, "recovery_timeout", now)
    if int(allowed):
        if state == CLOSED:
            return (CLEAN_CLOSED if len(reply) > 5 else ALLOW_CLOSED), None
        return Permit(True, HALF_OPEN, 0.0, probe_id), transition
    if state == HALF_OPEN:
        wait = probe_wait(float(_text(earliest)), now)
        return Permit(False, HALF_OPEN, wait, None), transition
    opened = _num(opened_at)
    wait = cfg.recovery_timeout if opened is None else opened + cfg.recovery_timeout - now
    return Permit(False, OPEN, wait, None), None


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

    def keys(self, module: str) -> list[Arg]:
        """The state hash, the probe leases and the failure-rate window of ``module``."""
        base = self.prefix + module
        return [base, base + ":probes", base + ":window"]

    async def acquire(
        self, module: str, cfg: BreakerConfig, now: float
    ) -> tuple[Permit, Transition | None]:
        probe_id = probe_token()
        base = self.prefix + module
        args: list[Arg] = [
            repr(now),
            repr(cfg.recovery_timeout),
            cfg.half_open_max_calls,
            probe_id,
            repr(now + cfg.probe_lease_seconds),
        ]
        reply = await self.scripts.run_script(BREAKER_ACQUIRE, [base, base + ":probes"], args)
        return acquire_reply(reply, module, cfg, now, probe_id)

    async def record(
        self, module: str, cfg: BreakerConfig, now: float, *, failure: bool, probe_id: str | None
    ) -> Transition | None:
        width = (cfg.window_seconds or 0.0) / WINDOW_BUCKETS if cfg.uses_window else 0.0
        args: list[Arg] = [
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
        reply = await self.scripts.run_script(BREAKER_RECORD, self.keys(module), args)
        if not reply:
            return None
        before, after, reason = (_text(v) for v in reply)
        return Transition(module, before, after, reason, now)

    def _parse(self, values: list[Any], cfg: BreakerConfig, now: float) -> BreakerStatus:
        state, failures, last_failure, opened_at, forced = (_text(v) for v in values)
        return report(
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
        check_action(action)
        reply = await self.scripts.run_script(BREAKER_FORCE, self.keys(module), [action])
        before, after = (_text(v) for v in reply)
        return None if before == after else Transition(module, before, after, action, now)

    async def mark_healthy(self, module: str, cfg: BreakerConfig, now: float) -> Transition | None:
        moved = await self.scripts.run_script(BREAKER_HEALTHY, self.keys(module)[:2], [])
        return Transition(module, OPEN, HALF_OPEN, "health_check", now) if int(moved) else None

    async def release(self, module: str, probe_id: str) -> None:
        await self.scripts.run_script(
            BREAKER_RELEASE, [self.prefix + module + ":probes"], [probe_id]
        )


# --------------------------------------------------------------------------- admission


class RedisAdmission:
    """The rate limit and the breaker's read-only peek in one script (``admit.lua``).

    The peek answers the common cases: a closed breaker (the permit for the first attempt)
    and an open breaker before its recovery time (refused). Anything that needs writes —
    the move to half-open, a probe lease — answers ``None``: left to the breaker's own
    ``acquire``, so a permit obtained here never holds anything to give back.
    """

    __slots__ = ("breakers", "limits", "runner")

    def __init__(self, limits: RedisRateLimitBackend, breakers: RedisBreakerBackend) -> None:
        if limits.runner is not breakers.scripts:
            raise ValueError("a combined admission needs both stores on one script runner")
        self.limits = limits
        self.breakers = breakers
        self.runner = limits.runner

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
        """Charge ``scopes`` (all or nothing); if admitted (or ``shadow``), peek the breaker."""
        base = self.breakers.prefix + module
        keys: list[Arg] = [base, base + ":probes"]
        args: list[Arg] = [
            repr(now),
            f"{now!r}:{_member_suffix()}",
            1,
            "1" if shadow else "0",
            repr(breaker_now),
            repr(cfg.recovery_timeout),
        ]
        self.limits.add_call(scopes, now, keys, args)
        reply = await self.runner.run_script(ADMIT, keys, args)
        decision = self.limits.decision(scopes, now, reply[0])
        if len(reply) < 2:
            return decision, None
        # A peek answers closed or open, never a probe: no probe id, never a transition.
        return decision, acquire_reply(reply[1], module, cfg, breaker_now, "")[0]


def combined(limits: object, breakers: object) -> RedisAdmission | None:
    """The one-round-trip admission over these two stores, if they are one Redis."""
    if (
        isinstance(limits, RedisRateLimitBackend)
        and isinstance(breakers, RedisBreakerBackend)
        and limits.runner is breakers.scripts
    ):
        return RedisAdmission(limits, breakers)
    return None


__all__ = [
    "RedisAdmission",
    "RedisBreakerBackend",
    "RedisRateLimitBackend",
    "acquire_reply",
    "combined",
]
