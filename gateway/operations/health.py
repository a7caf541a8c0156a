"""Active health checks: when to probe each module, the probe itself, and who probes.

Schedule (:class:`HealthSchedule`, plain Python, injected ``rng``), per module::

    healthy ──probe fails──► incident ──down_after consecutive failures──► down
       ▲                       │  every incident_interval (1 s)            │ backoff: 2 s, 4 s,
       │                       └──probe passes──┐                          │ 8 s … max_backoff
       │                                        ▼                          │
       └──confirm_after consecutive passes── recovering ◄──probe passes────┘
         (every interval, 5 s)                 every incident_interval (1 s)

A module "stays down" once ``down_after`` (3) probes in a row have failed: from then on the
delay doubles from the incident interval (2 s after the 3rd failure, 4 s after the 4th …)
up to ``VX11_HEALTH_MAX_BACKOFF``. Every delay is jittered ±10 % (never above the maximum),
so many modules — or many hosts' checkers after a failover — do not probe in lock-step.

Who probes: with Redis, one checker in the whole deployment, the holder of a lease
(``SET NX PX`` with a random token, renewed by a compare-and-renew script, released on
shutdown). A standby checker retries every renewal period and takes over once the lease
expires, within ``lease_ttl`` + one renewal period (3 s + 1 s by default: less than one
healthy interval). Without Redis the worker is the leader.

A probe is ``GET <module url><health_path>``; a 2xx within ``VX11_HEALTH_TIMEOUT`` passes.
Results go to ``ModuleHealth`` rows, ``vx11_module_up``, the live event stream (on a status
change or when a module is declared down), and a passing probe lets an open breaker try
half-open early. Probes never count as breaker failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from redis.exceptions import RedisError

from gateway.config.modules import ModuleInfo, build_modules
from gateway.core import metrics
from gateway.core.clock import Clock
from gateway.operations import events

log = logging.getLogger("gateway.health")

UP, DOWN, UNKNOWN = "up", "down", "unknown"
LEASE_KEY = "vx11:health:leader"
USER_AGENT = "vx11-gateway-health/1.0"

# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class ModuleState:
    """What the schedule needs to know about one module's recent probes."""

    status: str = UNKNOWN
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    #: True from the first failure until ``confirm_after`` passes in a row.
    incident: bool = False


@dataclass(frozen=True)
class HealthSchedule:
    interval: float = 5.0
    incident_interval: float = 1.0
    max_backoff: float = 60.0
    down_after: int = 3
    confirm_after: int = 2
    jitter: float = 0.1

    def after(self, state: ModuleState, ok: bool) -> ModuleState:
        """The state once a probe passed (``ok``) or failed."""
        if ok:
            successes = state.consecutive_successes + 1
            incident = state.incident and successes < self.confirm_after
            return ModuleState(UP, 0, successes, incident)
        return ModuleState(DOWN, state.consecutive_failures + 1, 0, True)

    def phase(self, state: ModuleState) -> str:
        if state.consecutive_failures >= self.down_after:
            return "down"
        if state.consecutive_failures:
            return "incident"
        if state.incident:
            return "recovering"
        return "healthy"

    def base_delay(self, state: ModuleState) -> float:
        """Seconds until the next probe, before jitter."""
        phase = self.phase(state)
        if phase == "down":
            doublings = state.consecutive_failures - self.down_after + 1
            # Capped exponent: a module down for days must not overflow the float.
            return min(self.max_backoff, self.incident_interval * 2.0 ** min(doublings, 60))
        if phase in ("incident", "recovering"):
            return self.incident_interval
        return self.interval

    def next_delay(self, state: ModuleState, rng: Callable[[], float] = random.random) -> float:
        """The jittered delay: ``base × (1 ± jitter)``, never above ``max_backoff``."""
        base = self.base_delay(state)
        jittered = base * (1.0 + self.jitter * (2.0 * rng() - 1.0))
        return max(0.0, min(jittered, max(self.max_backoff, base)))

    @classmethod
    def from_settings(cls) -> HealthSchedule:
        from gateway.core.conf import gw

        return cls(
            interval=float(gw.health_interval),
            incident_interval=float(gw.health_incident_interval),
            max_backoff=float(gw.health_max_backoff),
        )


# --------------------------------------------------------------------------- leases


class Lease(Protocol):
    held: bool

    async def hold(self) -> bool: ...

    async def release(self) -> None: ...


class LocalLease:
    """No shared store: this worker is the only checker, so always the leader."""

    held = True

    async def hold(self) -> bool:
        return True

    async def release(self) -> None:
        return None


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLease:
    """Leadership as a Redis key holding our random token, with a TTL.

    ``hold()`` renews the lease when we have it (only if the key still holds our token)
    and tries to take it otherwise. If Redis cannot be reached we stop believing we lead
    once ``ttl`` has passed since the last successful renewal (``clock``: monotonic),
    because by then another checker may have taken over.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        key: str = LEASE_KEY,
        ttl: float = 3.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.client = client
        self.key = key
        self.ttl = ttl
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.held = False
        self._valid_until = 0.0
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def hold(self) -> bool:
        started = self.clock()
        try:
            ok = False
            if self.held:
                ok = bool(await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
            if not ok:
                ok = bool(await self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        except (RedisError, OSError) as exc:
            if self.held and self.clock() >= self._valid_until:
                self._change(False, f"store unreachable: {type(exc).__name__}")
            return self.held
        if ok:
            self._valid_until = started + self.ttl
        self._change(ok, "renewal failed: another checker holds the lease")
        return self.held

    def _change(self, held: bool, why: str) -> None:
        if held and not self.held:
            log.info("health-check leader lease acquired", extra={"lease": self.key})
        elif self.held and not held:
            log.warning("health-check leader lease lost", extra={"lease": self.key, "why": why})
        self.held = held

    async def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            await self._release(keys=[self.key], args=[self.token])
            log.info("health-check leader lease released", extra={"lease": self.key})
        except (RedisError, OSError):
            log.warning("could not release the health-check lease; it expires by itself")


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class ProbeResult:
    module: str
    ok: bool
    latency_ms: float | None
    error: str
    at: float  # epoch seconds


def _error_text(exc: Exception, timeout: float) -> str:
    """A short, secret-free reason (module URLs carry no credentials; headers are not shown)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout after {timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    return f"probe error: {type(exc).__name__}"


async def probe(
    client: httpx.AsyncClient,
    info: ModuleInfo,
    timeout: float,
    wall: Clock = time.time,
    timer: Clock = time.perf_counter,
) -> ProbeResult:
    """One ``GET url+health_path``; 2xx passes. Latency is measured on ``timer``."""
    at = wall()
    started = timer()
    try:
        response = await client.get(
            info.url + info.health_path, timeout=timeout, headers={"User-Agent": USER_AGENT}
        )
    except Exception as exc:
        return ProbeResult(info.name, False, None, _error_text(exc, timeout), at)
    latency = round((timer() - started) * 1000.0, 2)
    if 200 <= response.status_code < 300:
        return ProbeResult(info.name, True, latency, "", at)
    return ProbeResult(info.name, False, latency, f"HTTP {response.status_code}", at)


def health_dict(state: ModuleState, result: ProbeResult) -> dict[str, Any]:
    return {
        "status": state.status,
        "latency_ms": result.latency_ms,
        "last_check": result.at,
        "consecutive_failures": state.consecutive_failures,
        "last_error": result.error,
    }


def save_health(module: str, health: dict[str, Any]) -> None:
    """Write one ``ModuleHealth`` row (synchronous)."""
    from django.db import close_old_connections

    from gateway.models import ModuleHealth

    close_old_connections()  # a long-running worker outlives CONN_MAX_AGE and DB restarts
    ModuleHealth.objects.update_or_create(
        module=module,
        defaults={
            "status": health["status"],
            "latency_ms": health["latency_ms"],
            "last_check": datetime.fromtimestamp(health["last_check"], tz=UTC),
            "consecutive_failures": health["consecutive_failures"],
            "last_error": health["last_error"][:300],
        },
    )


def load_states() -> dict[str, ModuleState]:
    """The stored results, so a restarted or newly elected checker continues the backoff."""
    from gateway.models import ModuleHealth

    return {
        row.module: ModuleState(
            row.status,
            row.consecutive_failures,
            0 if row.consecutive_failures else 1,
            bool(row.consecutive_failures),
        )
        for row in ModuleHealth.objects.all()
    }


def load_modules() -> dict[str, ModuleInfo]:
    """The module table straight from the database (the worker sees admin edits at once)."""
    from gateway.models import Module

    rows = [
        ModuleInfo(m.name, m.url, m.health_path, m.enabled, "database")
        for m in Module.objects.all()
    ]
    return build_modules(rows)


async def _mark_healthy(module: str) -> None:
    from gateway.operations import registry as services

    await services.get().breaker.mark_healthy(module)


class HealthChecker:
    """Probes enabled modules on the schedule while it holds the lease.

    Each probe runs as its own task, so a slow module delays neither the others nor the
    lease renewal. ``step()`` is one turn of the loop (tests drive it with a fake clock).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        schedule: HealthSchedule | None = None,
        lease: Lease | None = None,
        timeout: float = 2.0,
        modules: Callable[[], Awaitable[dict[str, ModuleInfo]]] | None = None,
        mark_healthy: Callable[[str], Awaitable[Any]] = _mark_healthy,
        persist: bool = True,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        rng: Callable[[], float] = random.random,
        renew_every: float = 1.0,
    ) -> None:
        self.client = client
        self.schedule = schedule or HealthSchedule()
        self.lease: Lease = lease or LocalLease()
        self.timeout = timeout
        self._modules = modules or sync_to_async(load_modules, thread_sensitive=True)
        self.mark_healthy = mark_healthy
        self.persist = persist
        self.clock = clock
        self.wall = wall
        self.rng = rng
        self.renew_every = renew_every
        self.states: dict[str, ModuleState] = {}
        self.due: dict[str, float] = {}
        self.inflight: dict[str, asyncio.Task[ProbeResult]] = {}
        self.table: dict[str, ModuleInfo] = {}
        self._table_at = -1e18
        self._leading = False
        self._lease_at = -1e18
        self._states_loaded = False

    async def _load_states(self) -> None:
        self._states_loaded = True
        if not self.persist:
            return
        try:
            stored = await sync_to_async(load_states, thread_sensitive=True)()
        except Exception:
            log.exception("could not read stored module health; starting from unknown")
            return
        self.states.update(stored)

    async def enabled_modules(self) -> dict[str, ModuleInfo]:
        """The module table, re-read at most once per incident interval; DB down: the last."""
        now = self.clock()
        if now - self._table_at >= self.schedule.incident_interval:
            try:
                self.table = await self._modules()
                self._table_at = now
            except Exception:
                log.exception("could not read the module table; using the previous one")
        return {name: info for name, info in self.table.items() if info.enabled}

    async def check(self, info: ModuleInfo) -> ProbeResult:
        """Probe one module now and apply the result (state, store, metrics, events)."""
        if not self._states_loaded:
            await self._load_states()
        result = await probe(self.client, info, self.timeout, self.wall)
        await self.apply(result)
        return result

    async def apply(self, result: ProbeResult) -> ModuleState:
        name = result.module
        before = self.states.get(name, ModuleState())
        state = self.schedule.after(before, result.ok)
        self.states[name] = state
        self.due[name] = self.clock() + self.schedule.next_delay(state, self.rng)
        health = health_dict(state, result)
        metrics.module_up(name, result.ok)
        if self.persist:
            try:
                await sync_to_async(save_health, thread_sensitive=True)(name, health)
            except Exception:
                log.exception("could not store a health result", extra={"gw_module": name})
        declared_down = state.consecutive_failures == self.schedule.down_after
        if before.status != state.status or declared_down:
            self._announce(name, before, state, result)
            events.emit({"type": "module.health", "module": name, **health})
        if result.ok:
            try:
                await self.mark_healthy(name)
            except Exception:
                log.exception("could not move the breaker to half-open", extra={"gw_module": name})
        return state

    def _announce(
        self, name: str, before: ModuleState, state: ModuleState, result: ProbeResult
    ) -> None:
        extra = {
            "gw_module": name,
            "latency_ms": result.latency_ms,
            "error": result.error,
            "consecutive_failures": state.consecutive_failures,
        }
        if state.status == UP:
            log.info("module up", extra={**extra, "was": before.status})
        elif state.consecutive_failures == self.schedule.down_after:
            log.error("module stays down; probing with backoff", extra=extra)
        else:
            log.warning("module down", extra={**extra, "was": before.status})

    async def step(self) -> float:
        """Renew the lease, start the probes that are due; seconds until the next turn."""
        now = self.clock()
        leading = self._leading
        if not leading or now - self._lease_at >= self.renew_every / 2:
            leading = await self.lease.hold()
            self._lease_at = now
        if leading and not self._leading:
            await self._load_states()  # another checker may have written newer results
            self.due.clear()
        self._leading = leading
        if not leading:
            return self.renew_every
        modules = await self.enabled_modules()
        now = self.clock()
        for name in list(self.due):
            if name not in modules:
                del self.due[name]
        for name, info in modules.items():
            if name in self.inflight or self.due.get(name, now) > now:
                continue
            self.due[name] = now + self.timeout  # placeholder until the result is applied
            task = asyncio.get_running_loop().create_task(self.check(info))
            self.inflight[name] = task
            task.add_done_callback(functools.partial(self._probe_done, name))
        waits = [due - now for name, due in self.due.items() if name not in self.inflight]
        return max(0.0, min([self.renew_every, *waits]))

    def _probe_done(self, name: str, task: asyncio.Task[ProbeResult]) -> None:
        if self.inflight.get(name) is task:
            del self.inflight[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("health probe crashed", exc_info=exc, extra={"gw_module": name})

    async def drain(self) -> None:
        """Wait for the probes in flight (tests, ``--once``)."""
        while self.inflight:
            await asyncio.gather(*list(self.inflight.values()), return_exceptions=True)

    async def run_once(self) -> list[ProbeResult]:
        """Probe every enabled module once, without the lease (an operator's one-shot check)."""
        if not self._states_loaded:
            await self._load_states()  # before the probes run side by side
        modules = await self.enabled_modules()
        results = await asyncio.gather(*(self.check(info) for info in modules.values()))
        return sorted(results, key=lambda r: r.module)

    async def run(self, stop: asyncio.Event) -> None:
        """The worker loop, until ``stop`` is set; then releases the lease."""
        log.info("health checker started")
        try:
            while not stop.is_set():
                try:
                    wait = await self.step()
                except Exception:
                    log.exception("health-check loop error; retrying")
                    wait = self.renew_every
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=max(wait, 0.01))
        finally:
            for task in list(self.inflight.values()):
                task.cancel()
            await asyncio.gather(*list(self.inflight.values()), return_exceptions=True)
            await self.lease.release()
            log.info("health checker stopped")


def probe_now(info: ModuleInfo) -> tuple[ProbeResult, ModuleState]:
    """Probe one module at once and store the result, from sync code (the admin action).

    Continues from the stored state (failure count), so the worker's schedule and the
    admin see the same numbers; a pass lets an open breaker try half-open, as in the worker.
    """
    from asgiref.sync import async_to_sync

    from gateway.api.breakers import management_breaker
    from gateway.core.conf import gw

    async def run() -> tuple[ProbeResult, ModuleState]:
        async with (
            httpx.AsyncClient(follow_redirects=False, trust_env=False) as client,
            management_breaker({info.name: info}) as breaker,
        ):
            checker = HealthChecker(
                client,
                schedule=HealthSchedule.from_settings(),
                timeout=float(gw.health_timeout),
                mark_healthy=breaker.mark_healthy,
            )
            result = await checker.check(info)
            await events.flush()
            return result, checker.states[info.name]

    return async_to_sync(run)()


__all__ = [
    "DOWN",
    "UNKNOWN",
    "UP",
    "HealthChecker",
    "HealthSchedule",
    "LocalLease",
    "ModuleState",
    "ProbeResult",
    "RedisLease",
    "health_dict",
    "load_modules",
    "probe",
    "probe_now",
]
