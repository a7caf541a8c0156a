"""``manage.py run_health_checks``: the active health-check worker (SPEC §11).

Long-running by default: probes every enabled module on the schedule of
:class:`gateway.operations.health.HealthSchedule`, one checker per deployment when Redis is
configured (leader lease), and stops cleanly on SIGTERM or SIGINT, releasing the lease.
``--once`` probes every enabled module once, stores the results, prints a table and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.core.management.base import BaseCommand, CommandParser

from gateway.core.conf import gw
from gateway.operations import events
from gateway.operations.health import (
    HealthChecker,
    HealthSchedule,
    Lease,
    LocalLease,
    ModuleState,
    ProbeResult,
    RedisLease,
    probe_transport,
)
from gateway.state import store
from sessions_ctx7.services import clear_expired


async def _close_shared_clients() -> None:
    if store.shared():
        with contextlib.suppress(Exception):
            await store.async_client().aclose()
        with contextlib.suppress(Exception):
            await store.script_client().aclose()


class Command(BaseCommand):
    help = (
        "Probe every enabled module's health path (5 s healthy, 1 s in an incident, "
        "backoff while down); one checker at a time across hosts when Redis is configured."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="Probe every enabled module once, store the results, print a table and exit.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            results = asyncio.run(self._once())
            self._table(results)
            return
        asyncio.run(self._serve())

    async def _once(self) -> list[tuple[ProbeResult, ModuleState]]:
        try:
            async with probe_transport() as client:
                checker = HealthChecker(
                    client,
                    schedule=HealthSchedule.from_settings(),
                    timeout=gw.health_timeout,
                )
                results = await checker.run_once()
                with contextlib.suppress(TimeoutError):
                    await events.flush(2.0)
                return [(r, checker.states[r.module]) for r in results]
        finally:
            await _close_shared_clients()

    def _table(self, rows: list[tuple[ProbeResult, ModuleState]]) -> None:
        header = f"{'MODULE':<14} {'STATUS':<8} {'LATENCY_MS':>10} {'FAILURES':>8}  ERROR"
        self.stdout.write(header)
        for result, state in rows:
            latency = "-" if result.latency_ms is None else f"{result.latency_ms:.1f}"
            status, failures = state.status, state.consecutive_failures
            line = f"{result.module:<14} {status:<8} {latency:>10} {failures:>8}  {result.error}"
            self.stdout.write(line.rstrip())
        up = sum(1 for _, s in rows if s.status == "up")
        degraded = sum(1 for _, s in rows if s.status == "degraded")
        summary = f"{len(rows)} module(s) probed: {up} up, {len(rows) - up - degraded} down"
        summary += f", {degraded} degraded (some targets down)" if degraded else ""
        style = self.style.SUCCESS if up == len(rows) else self.style.WARNING
        self.stdout.write(style(summary))

    async def _purge_context7(self, stop: asyncio.Event) -> None:
        """Delete expired Context-7 sessions every VX11_CONTEXT7_PURGE_INTERVAL seconds."""
        interval = gw.context7_purge_interval
        if interval <= 0:
            return
        log = logging.getLogger("gateway.health")
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                removed = await sync_to_async(clear_expired, thread_sensitive=False)()
            except Exception:
                log.exception("could not purge expired Context-7 sessions")
            else:
                if removed:
                    log.info("purged expired Context-7 sessions", extra={"removed": removed})

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        schedule = HealthSchedule.from_settings()
        renew_every = schedule.incident_interval
        redis_client: aioredis.Redis | None = None
        lease: Lease
        if store.shared():
            redis_client = aioredis.Redis.from_url(
                store.redis_url(), socket_timeout=1.0, socket_connect_timeout=1.0
            )
            lease = RedisLease(redis_client, ttl=3 * renew_every)
            mode = "leader election through Redis"
        else:
            lease = LocalLease()
            mode = "no shared store: this worker is the only checker"
        self.stdout.write(
            f"health checks: every {schedule.interval:g} s healthy, "
            f"{schedule.incident_interval:g} s in an incident, up to "
            f"{schedule.max_backoff:g} s while down ({mode}); Ctrl-C stops"
        )
        self.stdout.flush()
        try:
            async with probe_transport() as client:
                checker = HealthChecker(
                    client,
                    schedule=schedule,
                    lease=lease,
                    timeout=gw.health_timeout,
                    renew_every=renew_every,
                )
                purge = asyncio.create_task(self._purge_context7(stop), name="vx11-purge")
                try:
                    await checker.run(stop)
                finally:
                    purge.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await purge
            with contextlib.suppress(Exception):
                await events.flush(0.5)
        finally:
            if redis_client is not None:
                await redis_client.aclose()
            await _close_shared_clients()
        self.stdout.write("health checks stopped")
