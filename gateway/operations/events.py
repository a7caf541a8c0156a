"""Gateway events: recorded and published off the request path.

Breaker transitions, module health changes, route changes and cache clears go
into a bounded per-loop queue; a background task writes them to the database
(transitions, breaker snapshot) and publishes them on the channel layer group
``vx11.events`` that ``/ws/events`` listens to. The request that caused an event
never waits for either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer

from gateway.core import metrics
from gateway.models import BreakerState, BreakerTransition

log = logging.getLogger("gateway.events")
GROUP = "vx11.events"
QUEUE_MAX = 10_000

_queues: dict[int, asyncio.Queue[dict[str, Any]]] = {}
_tasks: dict[int, asyncio.Task[None]] = {}


def _epoch(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


def record_transition(event: dict[str, Any]) -> None:
    """Write one transition and the module's breaker snapshot (synchronous)."""
    at = _epoch(event["at"]) or datetime.now(tz=UTC)
    BreakerTransition.objects.create(
        module=event["module"],
        from_state=event["from"],
        to_state=event["to"],
        reason=event["reason"][:60],
        at=at,
    )
    defaults: dict[str, Any] = {"state": event["to"]}
    if event["to"] == "open":
        defaults["opened_at"] = at
    if event["reason"] in ("reset", "probe_succeeded"):
        defaults.update(failure_count=0, opened_at=None)
    if event["reason"] in ("force_open", "force_closed"):
        defaults["forced"] = event["reason"].removeprefix("force_")
    elif event["reason"] in ("auto", "reset"):
        defaults["forced"] = ""
    BreakerState.objects.update_or_create(module=event["module"], defaults=defaults)


def _publish_sync(event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        async_to_sync(layer.group_send)(GROUP, {"type": "gateway.event", "event": event})


async def _publish(event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(GROUP, {"type": "gateway.event", "event": event})


async def _drain(queue: asyncio.Queue[dict[str, Any]]) -> None:
    while True:
        event = await queue.get()
        try:
            if event["type"] == "breaker.transition":
                await sync_to_async(record_transition, thread_sensitive=False)(event)
            await _publish(event)
        except Exception:
            log.exception(
                "could not record or publish a gateway event",
                extra={"event_type": event.get("type")},
            )
        finally:
            queue.task_done()


def emit(event: dict[str, Any]) -> None:
    """Queue an event (from async code) or handle it at once (from sync code)."""
    event.setdefault("time", time.time())
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        if event["type"] == "breaker.transition":
            record_transition(event)
        try:
            _publish_sync(event)
        except Exception:
            log.exception("could not publish a gateway event")
        return
    key = id(loop)
    queue = _queues.get(key)
    task = _tasks.get(key)
    if queue is None or task is None or task.done():
        queue = asyncio.Queue(QUEUE_MAX)
        _queues[key] = queue
        _tasks[key] = loop.create_task(_drain(queue), name="vx11-events")
    try:
        queue.put_nowait(event)
    except asyncio.QueueFull:
        log.error("event queue full; dropping an event", extra={"event_type": event["type"]})


async def flush(timeout: float = 5.0) -> None:
    """Wait until this loop's queued events are written (tests, shutdown)."""
    queue = _queues.get(id(asyncio.get_running_loop()))
    if queue is not None:
        await asyncio.wait_for(queue.join(), timeout)


def wait_idle(timeout: float = 5.0) -> bool:
    """From any thread: wait until every loop's queued events are handled (tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(getattr(q, "_unfinished_tasks", 0) == 0 for q in list(_queues.values())):
            return True
        time.sleep(0.01)
    return False


def breaker_transition(transition: Any) -> None:
    """The breaker's ``on_transition`` hook: metrics now, the rest in the background."""
    metrics.breaker_transition(transition.module, transition.to_state)
    emit(
        {
            "type": "breaker.transition",
            "module": transition.module,
            "from": transition.from_state,
            "to": transition.to_state,
            "reason": transition.reason,
            "at": transition.at,
        }
    )


def target_ejected(ejection: Any) -> None:
    """A target's outlier ejection began (``ejected``) or ended early (SPEC §18):
    ``target.ejected`` on the live stream (a ``gateway.state.ejections.Ejection``)."""
    emit(
        {
            "type": "target.ejected",
            "module": ejection.module,
            "target": ejection.target,
            "ejected": ejection.ejected,
            "until": ejection.until,
            "count": ejection.count,
            "reason": ejection.reason,
            "at": ejection.at,
        }
    )


def target_health(module: str, target: str, health: dict[str, Any]) -> None:
    """``target.health`` on the live stream: a target's active-health status changed
    (``health``: status, latency_ms, last_check, consecutive_failures, last_error)."""
    emit({"type": "target.health", "module": module, "target": target, **health})
