"""Active health checks: the worker that probes each module on its schedule while it leads.

The parts: when to probe (``gateway.operations.health_schedule``), who probes
(``gateway.operations.health_lease``), the probe and its stored results
(``gateway.operations.probes``). Results go to ``ModuleHealth`` rows, ``vx11_module_up``,
the live event stream (on a status change or when a module is declared down), and a
passing probe lets an open breaker try half-open early. Probes never count as breaker
failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async

from gateway.config.modules import ModuleInfo
from gateway.core import metrics
from gateway.core.clock import Clock
from gateway.core.conf import gw
from gateway.operations import events
from gateway.operations import registry as services
from gateway.operations.breakers import management_breaker
from gateway.operations.health_lease import LEASE_KEY, Lease, LocalLease, RedisLease
from gateway.operations.health_schedule import DOWN, UNKNOWN, UP, HealthSchedule, ModuleState
from gateway.operations.probes import (
    USER_AGENT,
    ProbeResult,
    health_dict,
    load_modules,
    load_states,
    probe,
    probe_transport,
    save_health,
)
from gateway.upstream import Transport

log = logging.getLogger("gateway.health")


async def _mark_healthy(module: str) -> None:
    await services.get().breaker.mark_healthy(module)


class HealthChecker:
    """Probes enabled modules on the schedule while it holds the lease.

    Each probe runs as its own task, so a slow module delays neither the others nor the
    lease renewal. ``step()`` is one turn of the loop (tests drive it with a fake clock).
    """

    def __init__(
        self,
        client: Transport,
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

    async def run() -> tuple[ProbeResult, ModuleState]:
        async with probe_transport() as client, management_breaker({info.name: info}) as breaker:
            checker = HealthChecker(
                client,
                schedule=HealthSchedule.from_settings(),
                timeout=gw.health_timeout,
                mark_healthy=breaker.mark_healthy,
            )
            result = await checker.check(info)
            await events.flush()
            return result, checker.states[info.name]

    return async_to_sync(run)()


__all__ = [
    "DOWN",
    "LEASE_KEY",
    "UNKNOWN",
    "UP",
    "USER_AGENT",
    "HealthChecker",
    "HealthSchedule",
    "Lease",
    "LocalLease",
    "ModuleState",
    "ProbeResult",
    "RedisLease",
    "health_dict",
    "load_modules",
    "load_states",
    "probe",
    "probe_now",
    "probe_transport",
    "save_health",
]
