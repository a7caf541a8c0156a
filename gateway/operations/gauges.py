"""Gauges read at scrape time (``/metrics``): breaker states, module health, live sessions."""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.utils import timezone

from gateway.config.snapshot import holder
from gateway.core import metrics
from gateway.models import ModuleHealth
from gateway.operations import registry
from sessions_ctx7.models import Session

log = logging.getLogger("gateway.edge")


def _db_gauges() -> None:
    for module, status in ModuleHealth.objects.values_list("module", "status"):
        if status in ("up", "down"):
            metrics.module_up(module, status == "up")
    metrics.context7_active(Session.objects.filter(expires_at__gt=timezone.now()).count())


async def refresh_gauges() -> None:
    """Gauges read at scrape time: breaker states, module health, live Context-7 sessions.

    A failing source leaves its gauges as they were: a scrape must still answer.
    """
    try:
        snapshot = await holder.current()
        statuses = await asyncio.wait_for(
            registry.get().breaker.statuses(sorted(snapshot.modules)), 2.0
        )
        for module, status in statuses.items():
            metrics.breaker_state(module, status.state)
    except Exception as exc:
        log.warning("breaker gauges not refreshed", extra={"error": type(exc).__name__})
    try:
        await sync_to_async(_db_gauges, thread_sensitive=False)()
    except Exception as exc:
        log.warning("database gauges not refreshed", extra={"error": type(exc).__name__})
