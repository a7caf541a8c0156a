"""Active health checks: the worker that probes each target on its schedule while it leads.

The parts: when to probe (``gateway.operations.health_schedule``), who probes
(``gateway.operations.health_lease``), the probe and its stored results
(``gateway.operations.probes``), what a target's result shares (``health_targets``). Every
enabled target of every enabled module has its own schedule (SPEC §11, §18). Per target:
``vx11_target_up``, the shared cache, ``target.health`` on a change, the down flag and the
early return of an ejection. Per module, the pool's verdict (up / degraded / down) goes to
its ``ModuleHealth`` row, ``vx11_module_up`` (1 while it serves: up or degraded) and
``module.health``; a passing probe lets an open breaker try half-open early. Probes never
count as breaker failures, nor as a target's passive failures. Without Redis the worker is
a process of its own: its down flags and per-target results stay in it.
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

from gateway.config.modules import ModuleInfo, TargetInfo
from gateway.core import metrics
from gateway.core.clock import Clock
from gateway.core.conf import gw
from gateway.operations import events
from gateway.operations import registry as services
from gateway.operations.breakers import management_breaker
from gateway.operations.health_lease import LEASE_KEY, Lease, LocalLease, RedisLease
from gateway.operations.health_schedule import (
    DEGRADED,
    DOWN,
    UNKNOWN,
    UP,
    HealthSchedule,
    ModuleState,
    pool_state,
)
from gateway.operations.health_targets import ejection_ends, enabled_targets, pool_error, share
from gateway.operations.probes import (
    USER_AGENT,
    ProbeResult,
    health_dict,
    load_modules,
    load_states,
    load_target_health,
    probe,
    probe_transport,
    save_health,
    save_target_health,
    target_state,
)
from gateway.policies.outlier import OutlierDetector
from gateway.upstream import Transport

log = logging.getLogger("gateway.health")


async def _mark_healthy(module: str) -> None:
    await services.get().breaker.mark_healthy(module)


def _detector() -> OutlierDetector:
    return services.get().outliers


#: A probe's key in the schedule: (module, target ``host:port``).
Key = tuple[str, str]


class HealthChecker:
    """Probes every enabled target of the enabled modules on the schedule while it leads.

    Each probe runs as its own task, so a slow target delays neither the others nor the
    lease renewal. ``step()`` is one turn of the loop (tests drive it with a fake clock).
    ``states``: each module's pool verdict; ``targets``: each (module, target)'s schedule.
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
        outliers: Callable[[], OutlierDetector] = _detector,
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
        self.outliers = outliers
        self.persist = persist
        self.clock = clock
        self.wall = wall
        self.rng = rng
        self.renew_every = renew_every
        self.states: dict[str, ModuleState] = {}
        self.targets: dict[Key, ModuleState] = {}
        #: Per module, each target's last result (``health_dict``), as stored in the cache.
        self.target_health: dict[str, dict[str, dict[str, Any]]] = {}
        self.due: dict[Key, float] = {}
        self.inflight: dict[Key, asyncio.Task[ProbeResult]] = {}
        self.table: dict[str, ModuleInfo] = {}
        #: Per module, the ejections seen in the last view (their ends are published here).
        self.ejected: dict[str, dict[str, float]] = {}
        self._table_at = -1e18
        self._leading = False
        self._lease_at = -1e18
        self._states_loaded = False

    async def _load_states(self) -> None:
        """Continue from the stored results: module rows, then per-target results."""
        self._states_loaded = True
        if not self.persist:
            return
        try:
            stored = await sync_to_async(load_states, thread_sensitive=True)()
            self.states.update(stored)
            found = await sync_to_async(load_target_health, thread_sensitive=True)(
                sorted(self.table) or sorted(stored)
            )
        except Exception:
            log.exception("could not read stored health; starting from unknown")
            return
        for module, by_key in found.items():
            self.target_health[module] = dict(by_key)
            for key, health in by_key.items():
                self.targets[(module, key)] = target_state(health)

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
        """Probe every enabled target of one module now and apply the results; the
        module's result (``ok``: it serves, up or degraded)."""
        if not self._states_loaded:
            if not self.table:
                self.table = {info.name: info}
            await self._load_states()
        results = await asyncio.gather(*(self.check_target(info, t) for t in enabled_targets(info)))
        return self.module_result(info, results[-1] if results else None)

    async def check_target(self, info: ModuleInfo, target: TargetInfo) -> ProbeResult:
        """Probe one target now and apply the result (state, store, metrics, events)."""
        result = await probe(self.client, info, self.timeout, self.wall, target=target)
        await self.apply(info, result)
        return result

    def module_result(self, info: ModuleInfo, last: ProbeResult | None) -> ProbeResult:
        """The module's result after ``last`` (a target's): the pool's verdict (``ok``: it
        serves), the last latency and time, and which targets are down and why."""
        state = self.states.get(info.name, ModuleState())
        at = last.at if last is not None else self.wall()
        latency = last.latency_ms if last is not None else None
        if len(enabled_targets(info)) == 1:
            error = last.error if last is not None else ""
        else:
            error = pool_error(info, self.target_health.get(info.name, {}))
        return ProbeResult(info.name, state.status in (UP, DEGRADED), latency, error, at)

    async def apply(self, info: ModuleInfo, result: ProbeResult) -> ModuleState:
        """One target's result: its schedule and effects, then the module's verdict."""
        name, key = info.name, result.target
        before_t = self.targets.get((name, key), ModuleState())
        state_t = self.schedule.after(before_t, result.ok)
        self.targets[(name, key)] = state_t
        self.due[(name, key)] = self.clock() + self.schedule.next_delay(state_t, self.rng)
        health_t = health_dict(state_t, result)
        self.target_health.setdefault(name, {})[key] = health_t
        metrics.target_up(name, key, result.ok)
        await self._target_effects(info, key, before_t, state_t, health_t)
        return await self._module_effects(info, result)

    async def _target_effects(
        self,
        info: ModuleInfo,
        key: str,
        before: ModuleState,
        state: ModuleState,
        health: dict[str, Any],
    ) -> None:
        name = info.name
        if before.status != state.status and len(enabled_targets(info)) > 1:
            # (a module of one target: its module.health event says it all)
            events.target_health(name, key, health)
            level = logging.INFO if state.status == UP else logging.WARNING
            log.log(level, "target %s", state.status, extra={"gw_module": name, "target": key})
        try:
            if await share(self.outliers(), info, key, before, state) is not None:
                self.ejected.get(name, {}).pop(key, None)  # published by the detector
        except Exception:
            log.exception("could not share a target's health", extra={"gw_module": name})
        if self.persist:
            try:
                keys = {t.key for t in enabled_targets(info)}  # removed ones are forgotten
                found = {k: v for k, v in self.target_health[name].items() if k in keys}
                await sync_to_async(save_target_health, thread_sensitive=True)(name, found)
            except Exception:
                log.exception("could not store a target's health", extra={"gw_module": name})

    async def _module_effects(self, info: ModuleInfo, last: ProbeResult) -> ModuleState:
        name = info.name
        before = self.states.get(name, ModuleState())
        pool = [self.targets.get((name, t.key), ModuleState()) for t in enabled_targets(info)]
        state = self.states[name] = pool_state(pool)
        result = self.module_result(info, last)
        health = health_dict(state, result)
        metrics.module_up(name, state.status in (UP, DEGRADED))
        if self.persist:
            try:
                await sync_to_async(save_health, thread_sensitive=True)(name, health)
            except Exception:
                log.exception("could not store a health result", extra={"gw_module": name})
        declared_down = (
            state.consecutive_failures == self.schedule.down_after
            and before.consecutive_failures != state.consecutive_failures
        )
        if before.status != state.status or declared_down:
            self._announce(name, before, state, result)
            events.emit({"type": "module.health", "module": name, **health})
        if last.ok:
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
        elif state.status == DEGRADED:
            log.warning("module degraded", extra={**extra, "was": before.status})
        elif state.consecutive_failures == self.schedule.down_after:
            log.error("module stays down; probing with backoff", extra=extra)
        else:
            log.warning("module down", extra={**extra, "was": before.status})

    async def watch_ejections(self, modules: dict[str, ModuleInfo]) -> None:
        """Publish the ends of ejections by expiry (``target.ejected``), from the pools'
        views (≤ 1 s old, so an end is told within about a second of it)."""
        await ejection_ends(self.outliers(), modules, self.ejected, self.wall())

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
        await self.watch_ejections(modules)
        now = self.clock()
        wanted = {
            (name, t.key): (info, t)
            for name, info in modules.items()
            for t in enabled_targets(info)
        }
        for key in list(self.due):
            if key not in wanted:
                del self.due[key]
        for key, (info, target) in wanted.items():
            if key in self.inflight or self.due.get(key, now) > now:
                continue
            self.due[key] = now + self.timeout  # placeholder until the result is applied
            task = asyncio.get_running_loop().create_task(self.check_target(info, target))
            self.inflight[key] = task
            task.add_done_callback(functools.partial(self._probe_done, key))
        waits = [due - now for key, due in self.due.items() if key not in self.inflight]
        return max(0.0, min([self.renew_every, *waits]))

    def _probe_done(self, key: Key, task: asyncio.Task[ProbeResult]) -> None:
        if self.inflight.get(key) is task:
            del self.inflight[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "health probe crashed", exc_info=exc, extra={"gw_module": key[0], "target": key[1]}
            )

    async def drain(self) -> None:
        """Wait for the probes in flight (tests, ``--once``)."""
        while self.inflight:
            await asyncio.gather(*list(self.inflight.values()), return_exceptions=True)

    async def run_once(self) -> list[ProbeResult]:
        """Probe every enabled module once, without the lease (an operator's one-shot check)."""
        modules = await self.enabled_modules()
        if not self._states_loaded:
            await self._load_states()  # before the probes run side by side
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
    "DEGRADED",
    "DOWN",
    "LEASE_KEY",
    "UNKNOWN",
    "UP",
    "USER_AGENT",
    "HealthChecker",
    "HealthSchedule",
    "Key",
    "Lease",
    "LocalLease",
    "ModuleState",
    "ProbeResult",
    "RedisLease",
    "enabled_targets",
    "health_dict",
    "load_modules",
    "load_states",
    "probe",
    "probe_now",
    "probe_transport",
    "save_health",
]
