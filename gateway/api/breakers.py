"""Breakers and module health for operators: ``/vx11/modules`` and ``/vx11/circuit-breaker/*``.

The views are sync DRF views, the breaker is async. Each operation runs in
``async_to_sync`` on a breaker built for that one call (:func:`management_breaker`):
with Redis, a Redis client of its own, closed afterwards (a client belongs to the event
loop that opened it, and ``async_to_sync`` may make a new loop per call); without Redis,
the process-wide in-memory state that the proxy's loop uses too
(:func:`gateway.services.memory_breaker_backend`), so a reset or force is seen by the
very next proxied request. The admin actions and ``manage.py breaker`` call the same
functions.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from asgiref.sync import async_to_sync
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway import events, services, store
from gateway.api.authentication import principal_of
from gateway.api.permissions import IsClient, ReadClientWriteAdmin
from gateway.conf import gw
from gateway.modules import ModuleInfo
from gateway.policies.breaker import (
    FORCE_ACTIONS,
    BreakerBackend,
    BreakerStatus,
    CircuitBreaker,
    FallbackBreakerBackend,
    RedisBreakerBackend,
)
from gateway.problems import InvalidRequest, NotFound

log = logging.getLogger("gateway.breaker")

#: Store calls from management code may take longer than on the request path.
MANAGEMENT_STORE_TIMEOUT = 2.0

UNKNOWN_HEALTH: dict[str, Any] = {
    "status": "unknown",
    "latency_ms": None,
    "last_check": None,
    "consecutive_failures": 0,
    "last_error": "",
}


def module_table() -> dict[str, ModuleInfo]:
    """Every known module (code, env, database), read now from the database."""
    from gateway.snapshot import load_snapshot

    return load_snapshot(0).modules


@contextlib.asynccontextmanager
async def management_breaker(modules: dict[str, ModuleInfo]) -> AsyncIterator[CircuitBreaker]:
    """A breaker facade on the shared state, for one management operation on any loop.

    Transitions it causes are recorded (``BreakerTransition`` rows, live events) before
    the block ends, since the loop may end with it.
    """
    client: aioredis.Redis | None = None
    backend: BreakerBackend
    if store.shared():
        client = aioredis.Redis.from_url(
            store.redis_url(),
            socket_timeout=MANAGEMENT_STORE_TIMEOUT,
            socket_connect_timeout=MANAGEMENT_STORE_TIMEOUT,
        )
        backend = FallbackBreakerBackend(
            RedisBreakerBackend(client),
            services.memory_breaker_backend(),
            timeout=MANAGEMENT_STORE_TIMEOUT,
        )
    else:
        backend = services.memory_breaker_backend()
    breaker = CircuitBreaker(
        backend,
        lambda name: services.module_config(modules.get(name)),
        clock=time.time,
        on_transition=events.breaker_transition,
        enabled=bool(gw.cb_enabled),
    )
    try:
        yield breaker
        try:
            await events.flush()
        except TimeoutError:
            log.warning("breaker transition still queued after 5 s; it may be recorded late")
    finally:
        if client is not None:
            await client.aclose()


def _run[T](modules: dict[str, ModuleInfo], op: Callable[[CircuitBreaker], Awaitable[T]]) -> T:
    async def run() -> T:
        async with management_breaker(modules) as breaker:
            return await op(breaker)

    return async_to_sync(run)()


def breaker_statuses(
    modules: dict[str, ModuleInfo] | None = None, names: list[str] | None = None
) -> dict[str, BreakerStatus]:
    """The breakers of ``names`` (default: every known module), as read now."""
    table = module_table() if modules is None else modules
    wanted = sorted(table) if names is None else names
    return _run(table, lambda breaker: breaker.statuses(wanted))


def force_breaker(
    module: str, action: str, modules: dict[str, ModuleInfo] | None = None
) -> BreakerStatus:
    """Apply an operator action (reset, force_open, force_closed, auto); the new status."""
    if action not in FORCE_ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    table = module_table() if modules is None else modules

    async def op(breaker: CircuitBreaker) -> BreakerStatus:
        await breaker.force(module, action)
        return await breaker.status(module)

    return _run(table, op)


def health_rows() -> dict[str, dict[str, Any]]:
    from gateway.models import ModuleHealth

    return {
        row.module: {
            "status": row.status,
            "latency_ms": row.latency_ms,
            "last_check": row.last_check.timestamp() if row.last_check else None,
            "consecutive_failures": row.consecutive_failures,
            "last_error": row.last_error,
        }
        for row in ModuleHealth.objects.all()
    }


# --------------------------------------------------------------------------- views

_BREAKER_EXAMPLE = {
    "state": "open",
    "failure_count": 3,
    "last_failure": 1767225600.5,
    "opened_at": 1767225600.5,
    "retry_after": 42.1,
}


class ModuleListView(APIView):
    permission_classes = [IsClient]

    @extend_schema(
        responses=OpenApiTypes.OBJECT,
        summary="Every module with its URL, health and breaker state",
    )
    def get(self, request: Request) -> Response:
        table = module_table()
        health = health_rows()
        breakers = breaker_statuses(table)
        modules = [
            {
                "name": name,
                "url": info.url,
                "enabled": info.enabled,
                "source": info.source,
                "health_path": info.health_path,
                "health": health.get(name, UNKNOWN_HEALTH),
                "breaker": breakers[name].as_dict(),
            }
            for name, info in sorted(table.items())
        ]
        return Response({"modules": modules, "count": len(modules), "timestamp": time.time()})


class BreakerStatusView(APIView):
    permission_classes = [IsClient]

    @extend_schema(
        responses=OpenApiTypes.OBJECT,
        summary="Every module's circuit breaker",
        examples=[
            OpenApiExample(
                "One open breaker",
                value={
                    "status": "ok",
                    "breakers": {"switch": _BREAKER_EXAMPLE},
                    "timestamp": 1767225618.4,
                },
            )
        ],
    )
    def get(self, request: Request) -> Response:
        statuses = breaker_statuses()
        return Response(
            {
                "status": "ok",
                "breakers": {name: s.as_dict() for name, s in statuses.items()},
                "timestamp": time.time(),
            }
        )


def _known(module: str) -> dict[str, ModuleInfo]:
    table = module_table()
    if module not in table:
        raise NotFound(f"No module named {module[:40]!r}.", module=module[:40])
    return table


def _status_body(module: str, status: BreakerStatus, **extra: Any) -> dict[str, Any]:
    return {
        "status": "ok",
        "module": module,
        **extra,
        "breaker": status.as_dict(),
        "forced": status.forced,
        "timestamp": time.time(),
    }


class BreakerDetailView(APIView):
    permission_classes = [ReadClientWriteAdmin]

    @extend_schema(responses=OpenApiTypes.OBJECT, summary="One module's circuit breaker")
    def get(self, request: Request, module: str) -> Response:
        table = _known(module)
        return Response(_status_body(module, breaker_statuses(table, [module])[module]))

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses=OpenApiTypes.OBJECT,
        summary="Operator action on a breaker (admin)",
        description='Body `{"action": "reset" | "force_open" | "force_closed" | "auto"}`. '
        "reset: closed with counters cleared; force_open: refuse every call; force_closed: "
        "admit every call and never trip; auto: lift the override.",
        examples=[
            OpenApiExample("Open by hand", value={"action": "force_open"}, request_only=True)
        ],
    )
    def post(self, request: Request, module: str) -> Response:
        table = _known(module)
        data = request.data
        action = data.get("action") if isinstance(data, dict) else None
        if not isinstance(action, str) or action not in FORCE_ACTIONS:
            raise InvalidRequest(
                "The body must be a JSON object with action: one of "
                + ", ".join(sorted(FORCE_ACTIONS))
                + "."
            )
        status = force_breaker(module, action, table)
        principal = principal_of(request)
        log.info(
            "breaker action",
            extra={
                "gw_module": module,
                "action": action,
                "by": principal.name if principal else "?",
                "state": status.state,
            },
        )
        return Response(_status_body(module, status, action=action))
