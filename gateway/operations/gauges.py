"""Gauges read at scrape time (``/metrics``): breaker states, module and target health
(``vx11_module_up`` is 1 for a module that is up or degraded), live sessions."""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.utils import timezone

from gateway.config.snapshot import holder
from gateway.core import metrics
from gateway.models import ModuleHealth
from gateway.operations import registry
from gateway.operations.probes import load_target_health
from sessions_ctx7.models import Session

log = logging.getLogger("gateway.edge")


def _db_gauges(modules: list[str]) -> None:
    for module, status in ModuleHealth.objects.values_list("module", "status"):
        if status in ("up", "degraded", "down"):  # 1 while it serves: up or degraded
            metrics.module_up(module, status != "down")
    # Per-target results live in the shared cache (the worker writes them; SPEC §18).
    metrics.targets_up(
        {
            (module, target): health["status"] == "up"
            for module, found in load_target_health(modules).items()
            for target, health in found.items()
            if health.get("status") in ("up", "down")
        }
    )
    metrics.context7_active(Session.objects.filter(expires_at__gt=timezone.now()).count())


async def refresh_gauges() -> None:
    """Gauges read at scrape time: breaker states, module health, live Context-7 sessions.

    A failing source leaves its gauges as they were: a scrape must still answer.
    """
    names: list[str] = []
    try:
        snapshot = await holder.current()
        names = sorted(snapshot.modules)
        statuses = await asyncio.wait_for(
            registry.get().breaker.statuses(sorted(snapshot.modules)), 2.0
        )
        for module, status in statuses.items():
            metrics.breaker_state(module, status.state)
    except Exception as exc:
        log.warning("breaker gauges not refreshed", extra={"error": type(exc).__name__})
    try:
        await sync_to_async(_db_gauges, thread_sensitive=False)(names)
    except Exception as exc:
        log.warning("database gauges not refreshed", extra={"error": type(exc).__name__})
