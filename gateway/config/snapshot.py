"""The versioned configuration snapshot: modules, routes and API clients.

The hot path reads an immutable in-process :class:`Snapshot`. Every write of a
``Module``, ``Target``, ``Route`` or ``ApiClient`` — a save or delete (signals), a bulk write
(``ConfigQuerySet``), from the admin, the API, a command or a shell — announces
itself (:func:`gateway.models.announce_change`, NetBox's ``ConfigRevision`` idea) in
three places:

- the ``ConfigVersion`` row in the database, bumped in the writing transaction, which
  every process on that database sees (the embedded default: the gateway, ``manage.py``
  commands, a shell, the health worker are separate processes on one SQLite file);
- after the commit, this process's own counter (``store.LocalVersion``): its next
  request reloads;
- after the commit, with Redis, the counter in Redis, which every process and host sees.

A :class:`ConfigWatcher` thread per process reads the carrier (Redis when
configured, else the database row) every ``VX11_ROUTE_REFRESH_SECONDS`` and
records what it saw; a request compares two integers and reloads only when one
moved. So another process's change is live within a second, and the warm hot
path does no database or store call at all. An in-memory SQLite database has no
other process, so nothing is watched there. If the database is down during a
reload the old snapshot keeps serving; if the carrier is down, so does the last
version seen.

The watcher also calls its listeners when the version moves (and once at
start): ``gateway.operations.registry`` applies the breaker commands other processes left
in the database.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from asgiref.sync import sync_to_async
from django.db import connection

from gateway.config.modules import ModuleInfo, TargetInfo, build_modules
from gateway.config.routes import RouteConfig, build_routes
from gateway.core.conf import gw
from gateway.models import ApiClient, ConfigVersion, Module, Route, Target
from gateway.state import store

if TYPE_CHECKING:
    from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteWrapper

log = logging.getLogger("gateway.snapshot")
_serials = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    id: int
    name: str
    is_admin: bool
    rate_limit: int | None
    protected_rate_limit: int | None


@dataclass(frozen=True)
class Snapshot:
    version: int  # the carrier's version it reflects (0: unknown)
    modules: dict[str, ModuleInfo]
    routes: dict[str, RouteConfig]
    clients: dict[str, ClientInfo] = field(default_factory=dict)  # token hash -> client
    loaded_at: float = 0.0
    local: int = 0  # this process's own change counter when it was loaded
    #: Unique per load in this process (caches keyed on a snapshot use it).
    serial: int = field(default_factory=lambda: next(_serials))


def load_snapshot(version: int, local: int = 0) -> Snapshot:
    """Read the tables (synchronous; run in a thread from async code)."""
    rows = [m.info() for m in Module.objects.all()]
    routes = build_routes(list(Route.objects.all()))
    clients = {
        c.token_hash: ClientInfo(c.id, c.name, c.is_admin, c.rate_limit, c.protected_rate_limit)
        for c in ApiClient.objects.filter(active=True)
    }
    return Snapshot(
        version, build_modules(rows, load_targets()), routes, clients, time.time(), local
    )


def load_targets() -> dict[str, tuple[TargetInfo, ...]]:
    """Every module's ``Target`` rows, in id order (one query)."""
    pools: dict[str, list[TargetInfo]] = {}
    columns = ("module__name", "url", "weight", "enabled", "id")
    for name, url, weight, enabled, pk in Target.objects.order_by("id").values_list(*columns):
        pools.setdefault(name, []).append(TargetInfo(url, weight, enabled, pk))
    return {name: tuple(found) for name, found in pools.items()}


def watches_database() -> bool:
    """False for an in-memory SQLite database: no other process can write it."""
    if connection.vendor != "sqlite":
        return True
    return not cast("SQLiteWrapper", connection).is_in_memory_db()


class ConfigWatcher:
    """One thread per process: reads the carrier's version, tells listeners it moved."""

    def __init__(self) -> None:
        #: The carrier's version last read (None: not read yet, or the carrier changed).
        self.seen: int | None = None
        self.listeners: list[Callable[[], None]] = []
        self._carrier: str | None = None
        self._failing = False
        self._database: bool | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()

    @property
    def running(self) -> bool:
        """The thread was started (by the first snapshot load) and is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._start_lock:
            if self.running:
                return
            self._thread = threading.Thread(target=self._run, daemon=True, name="vx11-config")
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # never let the watcher die
                log.exception("configuration watcher failed; retrying")
            time.sleep(gw.route_refresh_seconds)

    def carrier(self) -> str | None:
        if store.shared():
            return "redis:" + store.redis_url()
        if self._database is None:  # a process's database is decided once (tests swap it)
            self._database = watches_database()
        return "db" if self._database else None

    def poll(self) -> None:
        """Read the version once (synchronous); call the listeners when it moved.

        The watcher thread keeps its database connection from one look to the next (a
        new PostgreSQL backend twice a second would be waste) and closes it only after an
        error, so the next look connects afresh (a database restart, a broken socket).
        Not ``close_if_unusable_or_obsolete()``: with ``conn_max_age=0`` (settings) every
        connection is obsolete at once and it would close after each look again.
        """
        with self._lock:
            carrier = self.carrier()
            if carrier != self._carrier:
                self._carrier, self.seen = carrier, None
            if carrier is None:
                return
            self._poll(carrier)

    def _poll(self, carrier: str) -> None:
        try:
            version = ConfigVersion.read() if carrier == "db" else store.read_shared_version()
        except Exception as exc:
            if not self._failing:  # once per outage, not twice a second
                log.warning("could not read the configuration version: %r", exc)
            self._failing = True
            if carrier == "db":
                connection.close()  # the next look connects afresh
            return  # keep serving the last version seen
        if self._failing:
            log.info("the configuration version can be read again")
            self._failing = False
        if version == self.seen:
            return
        for listener in self.listeners:
            try:
                listener()
            except Exception:
                log.exception("configuration listener failed")
                if carrier == "db":
                    connection.close()
        self.seen = version  # after the listeners: a first load waits for them


watcher = ConfigWatcher()


class SnapshotHolder:
    """Keeps this process's snapshot fresh. ``await current()`` is the hot-path call."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, source: ConfigWatcher = watcher
    ) -> None:
        self._clock = clock
        self._watcher = source
        self._snapshot: Snapshot | None = None
        self._retry_at = -1e18  # after a failed reload, the next try (on ``clock``)
        self._reload_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._reload_lock is None or self._lock_loop is not loop:
            self._reload_lock = asyncio.Lock()
            self._lock_loop = loop
        return self._reload_lock

    def _fresh(self, snap: Snapshot | None) -> bool:
        if snap is None or snap.local != store.LocalVersion.value:
            return False
        seen = self._watcher.seen
        return seen is None or seen == snap.version

    def _load(self) -> Snapshot:
        local = store.LocalVersion.value
        if self._watcher.seen is None and self._watcher.carrier() == "db":
            self._watcher.poll()  # first load: the version, and pending breaker commands
        return load_snapshot(self._watcher.seen or 0, local)

    async def current(self) -> Snapshot:
        snap = self._snapshot
        if snap is not None and snap.local == store.LocalVersion.value:
            seen = self._watcher.seen
            if seen is None or seen == snap.version:
                return snap  # the warm path: two integer comparisons
        if snap is not None and self._clock() < self._retry_at:
            return snap  # the last reload failed a moment ago: no retry per request
        self._watcher.start()
        async with self._lock():
            snap = self._snapshot
            if snap is not None and self._fresh(snap):
                return snap
            try:
                fresh = await sync_to_async(self._load, thread_sensitive=False)()
            except Exception:
                if snap is None:
                    raise
                log.exception("could not reload the configuration; serving the previous one")
                self._retry_at = self._clock() + gw.route_refresh_seconds
                return snap
            self._snapshot = fresh
            return fresh

    def invalidate(self) -> None:
        self._snapshot = None
        self._retry_at = -1e18

    @property
    def cached(self) -> Snapshot | None:
        return self._snapshot


holder = SnapshotHolder()
