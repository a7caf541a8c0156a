"""The versioned configuration snapshot: modules, routes and API clients.

The hot path reads an immutable in-process :class:`Snapshot`. Saving or
deleting a ``Module``, ``Route`` or ``ApiClient`` bumps a version number in the
shared store (NetBox's ``ConfigRevision`` idea); every process compares its
version with the store's at most every ``VX11_ROUTE_REFRESH_SECONDS`` and
reloads from the database when it changed. So a change reaches every process
and host within a second, with no database query per request once warm. If the
database is down during a reload the old snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async

from gateway import store
from gateway.conf import gw
from gateway.modules import ModuleInfo, build_modules
from gateway.routes import RouteConfig, build_routes

log = logging.getLogger(__name__)
VERSION_KEY = "vx11:config:version"


@dataclass(frozen=True, slots=True)
class ClientInfo:
    id: int
    name: str
    is_admin: bool
    rate_limit: int | None
    protected_rate_limit: int | None


@dataclass(frozen=True)
class Snapshot:
    version: int
    modules: dict[str, ModuleInfo]
    routes: dict[str, RouteConfig]
    clients: dict[str, ClientInfo] = field(default_factory=dict)  # token hash -> client
    loaded_at: float = 0.0


def load_snapshot(version: int) -> Snapshot:
    """Read the tables (synchronous; run in a thread from async code)."""
    from gateway.models import ApiClient, Module, Route

    rows = [
        ModuleInfo(
            m.name,
            m.url,
            m.health_path,
            m.enabled,
            "database",
            m.failure_threshold,
            m.recovery_timeout,
            m.half_open_max_calls,
            m.success_threshold,
            m.failure_rate_threshold,
            m.window_seconds,
            m.min_calls,
        )
        for m in Module.objects.all()
    ]
    routes = build_routes(list(Route.objects.all()))
    clients = {
        c.token_hash: ClientInfo(c.id, c.name, c.is_admin, c.rate_limit, c.protected_rate_limit)
        for c in ApiClient.objects.filter(active=True)
    }
    return Snapshot(version, build_modules(rows), routes, clients, time.time())


class _LocalVersion:
    """The version when nothing is shared (embedded default: one process)."""

    value = 0


def bump_version() -> None:
    """Announce a configuration change to every process (call after commit)."""
    _LocalVersion.value += 1
    if store.shared():
        try:
            store.sync_client().incr(VERSION_KEY)
        except Exception:  # the change is saved; processes catch up when Redis is back
            log.exception("could not publish the configuration version to Redis")


class SnapshotHolder:
    """Keeps this process's snapshot fresh. ``await current()`` is the hot-path call."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._checked_at = -1e18
        self._reload_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._reload_lock is None or self._lock_loop is not loop:
            self._reload_lock = asyncio.Lock()
            self._lock_loop = loop
        return self._reload_lock

    async def _store_version(self) -> int | None:
        try:
            # One store timeout at most: the request that checks waits for this.
            raw = await asyncio.wait_for(store.async_client().get(VERSION_KEY), gw.store_timeout)
        except Exception:
            return None  # store unreachable: keep serving what we have
        return int(raw or 0)

    async def current(self) -> Snapshot:
        snap = self._snapshot
        if not store.shared():
            # One process: the local counter is the truth, checking it is free.
            version: int | None = _LocalVersion.value
            if snap is not None and snap.version == version:
                return snap
        else:
            now = self._clock()
            if snap is not None and now - self._checked_at < gw.route_refresh_seconds:
                return snap
            self._checked_at = now
            version = await self._store_version()
        if snap is not None and (version is None or version == snap.version):
            return snap
        async with self._lock():
            snap = self._snapshot
            if snap is not None and version is not None and snap.version == version:
                return snap
            try:
                fresh = await sync_to_async(load_snapshot, thread_sensitive=False)(version or 0)
            except Exception:
                if snap is None:
                    raise
                log.exception("could not reload the configuration; serving the previous one")
                return snap
            self._snapshot = fresh
            return fresh

    def invalidate(self) -> None:
        self._snapshot = None
        self._checked_at = -1e18

    @property
    def cached(self) -> Snapshot | None:
        return self._snapshot


holder = SnapshotHolder()
