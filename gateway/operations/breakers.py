"""Breaker operations: status, reset/force, the breaker facade for one management call.

The DRF views (``gateway.api.breakers``), the admin actions, the dashboard,
``manage.py breaker`` and the health worker's ``probe_now`` all call these functions.

Management code is sync, the breaker is async. Each operation runs in
``async_to_sync`` on a breaker built for that one call (:func:`management_breaker`):
with Redis, a Redis client of its own, closed afterwards (a client belongs to the event
loop that opened it, and ``async_to_sync`` may make a new loop per call); without Redis,
the process-wide in-memory state that the proxy's loop uses too
(:func:`gateway.operations.registry.memory_breaker_backend`), so a reset or force is seen by the
very next proxied request.

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

from gateway.config.modules import ModuleInfo
from gateway.models import BreakerCommand, BreakerState, ModuleHealth, announce_change
from gateway.operations import events, registry
from gateway.operations.configuration import module_table
from gateway.operations.targets import target_list
from gateway.policies.breaker import CircuitBreaker
from gateway.state import store
from gateway.state.values import CLOSED, FORCE_ACTIONS, BreakerStatus, report

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


@contextlib.asynccontextmanager
async def management_breaker(modules: dict[str, ModuleInfo]) -> AsyncIterator[CircuitBreaker]:
    """A breaker facade on the shared state, for one management operation on any loop.

    Transitions it causes are recorded (``BreakerTransition`` rows, live events) before
    the block ends, since the loop may end with it.
    """
    client: aioredis.Redis | None = None
    if store.shared():
        client = aioredis.Redis.from_url(
            store.redis_url(),
            socket_timeout=MANAGEMENT_STORE_TIMEOUT,
            socket_connect_timeout=MANAGEMENT_STORE_TIMEOUT,
        )
    breaker = registry.breaker_facade(
        registry.breaker_backend(client, timeout=MANAGEMENT_STORE_TIMEOUT),
        lambda name: registry.module_config(modules.get(name)),
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
        cfg = registry.module_config(table.get(name))
        if row is None:
            found[name] = report(CLOSED, 0, None, None, None, cfg, now)
            continue
        found[name] = report(
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
            module=module, action=action, origin=registry.PROCESS_ID if applied_here else ""
        )
        cutoff = timezone.now() - timedelta(seconds=COMMAND_KEEP_SECONDS)
        BreakerCommand.objects.filter(
            module=module, id__lt=command.id, created_at__lt=cutoff
        ).delete()
        if not applied_here:  # no gateway here records the transition: note its effect
            BreakerState.objects.update_or_create(module=module, defaults=_STORED_EFFECT[action])


def health_rows() -> dict[str, dict[str, Any]]:
    """Every module's last stored health (``ModuleHealth`` rows), by module name."""
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


def force_many(
    names: list[str], action: str, modules: dict[str, ModuleInfo] | None = None
) -> list[tuple[str, BreakerStatus]]:
    """Apply one action to each known module of ``names`` (the admin's bulk action)."""
    table = module_table() if modules is None else modules
    return [(name, force_breaker(name, action, table)) for name in names if name in table]


def module_overview(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Every module (or those of ``names``) with its URL, stored health, breaker state and
    bulkhead (``GET /vx11/modules[/{module}]``): ``max_concurrent`` is the effective cap (0:
    none of its own), ``inflight`` / ``queued`` this process's use of it (``None``: no cap)."""
    table = module_table()
    wanted = sorted(table) if names is None else [n for n in names if n in table]
    health = health_rows()
    breakers = breaker_statuses(table, wanted)
    usage = registry.module_usage()
    found = []
    for name in wanted:
        info = table[name]
        cap = info.max_concurrent or 0
        inflight, queued = usage.get(name, (0, 0)) if cap else (None, None)
        found.append(
            {
                "name": name,
                "url": info.url,
                "lb": info.lb,
                "targets": target_list(info),
                "enabled": info.enabled,
                "source": info.source,
                "health_path": info.health_path,
                "health": health.get(name, UNKNOWN_HEALTH),
                "breaker": breakers[name].as_dict(),
                "max_concurrent": cap,
                "inflight": inflight,
                "queued": queued,
            }
        )
    return found
