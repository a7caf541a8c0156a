"""Breakers and module health for operators: ``/vx11/modules`` and ``/vx11/circuit-breaker/*``.

The views are sync DRF views, the breaker is async. Each operation runs in
``async_to_sync`` on a breaker built for that one call (:func:`management_breaker`):
with Redis, a Redis client of its own, closed afterwards (a client belongs to the event
loop that opened it, and ``async_to_sync`` may make a new loop per call); without Redis,
the process-wide in-memory state that the proxy's loop uses too
(:func:`gateway.operations.registry.memory_breaker_backend`), so a reset or force is seen by the
very next proxied request. The admin actions and ``manage.py breaker`` call the same
functions.

Without Redis an action is also written down for the other processes on the database
(``BreakerCommand``, announced by a configuration version bump): the other workers of the
gateway apply it within ``VX11_ROUTE_REFRESH_SECONDS`` (``gateway.operations.registry``). A
management command is not a gateway: it passes ``local=False``, so it only writes the
command and the module's ``BreakerState`` row (the state every gateway records on each
transition), and ``breaker status`` reads those rows.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from asgiref.sync import async_to_sync
from django.db import transaction
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.api.authentication import principal_of
from gateway.api.permissions import IsClient, ReadClientWriteAdmin
from gateway.api.serializers import (
    BreakerDetailSerializer,
    BreakerPageSerializer,
    ModuleListSerializer,
)
from gateway.config.modules import ModuleInfo
from gateway.core.conf import gw
from gateway.core.problems import InvalidRequest, NotFound
from gateway.models import BreakerCommand, BreakerState, announce_change
from gateway.operations import events
from gateway.operations import registry as services
from gateway.policies.breaker import (
    CLOSED,
    FORCE_ACTIONS,
    BreakerBackend,
    BreakerStatus,
    CircuitBreaker,
    FallbackBreakerBackend,
    RedisBreakerBackend,
    _report,
)
from gateway.state import store

log = logging.getLogger("gateway.breaker")

#: Store calls from management code may take longer than on the request path.
MANAGEMENT_STORE_TIMEOUT = 2.0
#: Commands older than this are pruned (each module's latest is kept: it may be an override).
COMMAND_KEEP_SECONDS = 60.0
#: What an action leaves in the module's ``BreakerState`` row when no gateway records it.
_STORED_EFFECT: dict[str, dict[str, Any]] = {
    "reset": {"state": CLOSED, "forced": "", "failure_count": 0, "opened_at": None},
    "force_open": {"forced": "open"},
    "force_closed": {"forced": "closed"},
    "auto": {"forced": ""},
}

UNKNOWN_HEALTH: dict[str, Any] = {
    "status": "unknown",
    "latency_ms": None,
    "last_check": None,
    "consecutive_failures": 0,
    "last_error": "",
}


def module_table() -> dict[str, ModuleInfo]:
    """Every known module (code, env, database), read now from the database."""
    from gateway.config.snapshot import load_snapshot

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
    modules: dict[str, ModuleInfo] | None = None,
    names: list[str] | None = None,
    *,
    local: bool = True,
) -> dict[str, BreakerStatus]:
    """The breakers of ``names`` (default: every known module), as read now.

    ``local=False`` (a management command, no Redis): as the gateways last recorded them.
    """
    table = module_table() if modules is None else modules
    wanted = sorted(table) if names is None else names
    if not local and not store.shared():
        return stored_statuses(table, wanted)
    return _run(table, lambda breaker: breaker.statuses(wanted))


def stored_statuses(table: dict[str, ModuleInfo], names: list[str]) -> dict[str, BreakerStatus]:
    """The ``BreakerState`` rows, reported as SPEC §6 says (open past its timeout: half-open)."""
    rows = {row.module: row for row in BreakerState.objects.filter(module__in=names)}
    now = time.time()
    found: dict[str, BreakerStatus] = {}
    for name in names:
        row = rows.get(name)
        cfg = services.module_config(table.get(name))
        if row is None:
            found[name] = _report(CLOSED, 0, None, None, None, cfg, now)
            continue
        found[name] = _report(
            row.state,
            row.failure_count,
            row.last_failure.timestamp() if row.last_failure else None,
            row.opened_at.timestamp() if row.opened_at else None,
            row.forced or None,
            cfg,
            now,
        )
    return found


def force_breaker(
    module: str,
    action: str,
    modules: dict[str, ModuleInfo] | None = None,
    *,
    local: bool = True,
) -> BreakerStatus:
    """Apply an operator action (reset, force_open, force_closed, auto); the new status.

    ``local``: this process is a gateway and applies it to its own breakers too (the
    API, the admin); a management command passes False.
    """
    if action not in FORCE_ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    table = module_table() if modules is None else modules

    async def op(breaker: CircuitBreaker) -> BreakerStatus:
        await breaker.force(module, action)
        return await breaker.status(module)

    if store.shared():
        return _run(table, op)
    status = _run(table, op) if local else None
    queue_command(module, action, applied_here=local)
    return status if status is not None else stored_statuses(table, [module])[module]


def queue_command(module: str, action: str, *, applied_here: bool) -> None:
    """Leave the action for the other processes on the database, and announce it."""
    with transaction.atomic():
        # The version row first: its bump holds the row's lock until the commit, so command
        # inserts are serialised with their commits in id order. The gateways read
        # ``id > cursor`` (``gateway.operations.registry.BreakerCommands``); without the lock two
        # concurrent inserts could commit out of id order on PostgreSQL and a cursor past
        # the later id would skip the earlier one. The bump commits with the row.
        announce_change()
        command = BreakerCommand.objects.create(
            module=module, action=action, origin=services.PROCESS_ID if applied_here else ""
        )
        cutoff = timezone.now() - timedelta(seconds=COMMAND_KEEP_SECONDS)
        BreakerCommand.objects.filter(
            module=module, id__lt=command.id, created_at__lt=cutoff
        ).delete()
        if not applied_here:  # no gateway here records the transition: note its effect
            BreakerState.objects.update_or_create(module=module, defaults=_STORED_EFFECT[action])


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
        responses=ModuleListSerializer,
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
        responses=BreakerPageSerializer,
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

    @extend_schema(responses=BreakerDetailSerializer, summary="One module's circuit breaker")
    def get(self, request: Request, module: str) -> Response:
        table = _known(module)
        return Response(_status_body(module, breaker_statuses(table, [module])[module]))

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses=BreakerDetailSerializer,
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
