"""``/ws/events``: the live event stream for staff sessions and admin tokens (SPEC §13).

On connect the client gets a ``snapshot`` (every module's breaker and health, and its
targets with theirs), then every event published on the channel layer group
:data:`gateway.operations.events.GROUP`: ``breaker.transition``, ``module.health``,
``target.health``, ``target.ejected``, ``route.changed``, ``cache.cleared``.
A client that reconnects resynchronises from the fresh snapshot; it may also ask
for one at any time by sending ``{"type": "snapshot"}``.

With the in-process channel layer (no Redis) events cannot cross processes, and the
health worker runs in its own; so then each connection also reads the stored health
results every couple of seconds and sends the changes as ``module.health``.

Close codes: 4401 when no credential was offered, 4403 when the credential is wrong,
not an admin, or a session cookie arrives from a foreign origin (a cookie is sent by
the browser on any page's behalf, so a session is only trusted from our own pages).

The credential is checked again every :attr:`EventsConsumer.recheck_seconds` (2 s) while
the stream is open: a revoked API client (the snapshot follows the configuration version,
so this costs no query) or a user made inactive or no longer staff (one primary-key read)
is closed with 4403 within a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.http.request import validate_host

from gateway.config.snapshot import holder
from gateway.core.asgi import header
from gateway.core.conf import gw
from gateway.edge import auth
from gateway.operations import events
from gateway.operations import registry as services
from gateway.operations.breakers import UNKNOWN_HEALTH, health_rows
from gateway.operations.targets import target_list

log = logging.getLogger("gateway.consumers")

CLOSE_AUTH_REQUIRED = 4401
CLOSE_FORBIDDEN = 4403


async def breaker_states(modules: list[str]) -> dict[str, dict[str, Any]]:
    """Each module's breaker as SPEC §6 reports it, plus the operator override."""
    statuses = await services.get().breaker.statuses(modules)
    return {name: {**s.as_dict(), "forced": s.forced} for name, s in statuses.items()}


async def state_snapshot() -> dict[str, Any]:
    """The ``snapshot`` message: all modules with URL, health and breaker."""
    snap = await holder.current()
    names = sorted(snap.modules)
    health = await database_sync_to_async(health_rows)()
    pools = await database_sync_to_async(
        lambda: {name: target_list(snap.modules[name]) for name in names}
    )()
    modules = {
        name: {
            "url": snap.modules[name].url,
            "enabled": snap.modules[name].enabled,
            "health_path": snap.modules[name].health_path,
            **health.get(name, UNKNOWN_HEALTH),
            "targets": pools[name],  # each with health, down, ejection (SPEC §18)
        }
        for name in names
    }
    return {
        "type": "snapshot",
        "breakers": await breaker_states(names),
        "modules": modules,
        "time": time.time(),
    }


def _staff_user_exists(pk: Any) -> bool:
    return bool(get_user_model().objects.filter(pk=pk, is_active=True, is_staff=True).exists())


def same_origin(scope: dict[str, Any]) -> bool:
    """The browser's ``Origin`` names this site (its Host) or a trusted origin."""
    origin = header(scope, b"origin")
    if not origin:
        return False
    if origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    parts = urlsplit(origin)
    host = header(scope, b"host") or ""
    allowed = list(settings.ALLOWED_HOSTS) or ["localhost", "127.0.0.1", "[::1]"]
    return (
        parts.scheme in ("http", "https")
        and parts.netloc == host
        and validate_host(parts.hostname or "", allowed)
    )


class EventsConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """Streams gateway events to one operator."""

    joined = False
    #: Without a shared channel layer the health worker (its own process) cannot reach
    #: this one's listeners, so the stored results are read this often instead.
    health_poll_seconds = 2.0
    _health_watch: asyncio.Task[None] | None = None
    _health_seen: dict[str, dict[str, Any]]
    #: How often an open stream's credential is checked again.
    recheck_seconds = 2.0
    _recheck: asyncio.Task[None] | None = None

    async def _authorise(self) -> int | None:
        """None when the caller may listen, else the close code."""
        token = auth.client_token(
            header(self.scope, b"x-vx11-token"), header(self.scope, b"authorization")
        )
        if token is not None:
            if not gw.auth_enabled:
                return None
            principal = auth.authenticate(token, await holder.current())
            if principal is None or not principal.is_admin:
                return CLOSE_FORBIDDEN
            return None
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            if not (user.is_active and user.is_staff):
                return CLOSE_FORBIDDEN
            return None if same_origin(self.scope) else CLOSE_FORBIDDEN
        if not gw.auth_enabled:
            return None
        return CLOSE_AUTH_REQUIRED

    async def _still_allowed(self) -> bool:
        """The credential accepted at connect is still good (revoked, deactivated?)."""
        token = auth.client_token(
            header(self.scope, b"x-vx11-token"), header(self.scope, b"authorization")
        )
        if token is not None:
            if not gw.auth_enabled:
                return True
            principal = auth.authenticate(token, await holder.current())
            return principal is not None and principal.is_admin
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            return bool(await database_sync_to_async(_staff_user_exists)(user.pk))
        return not gw.auth_enabled

    async def _watch_credential(self) -> None:
        while True:
            await asyncio.sleep(self.recheck_seconds)
            try:
                allowed = await self._still_allowed()
            except Exception:  # the database is down: keep the stream, try again later
                log.warning("could not re-check a live stream's credential", exc_info=True)
                continue
            if not allowed:
                log.info("closing a live stream whose credential was revoked")
                await self.close(code=CLOSE_FORBIDDEN)
                return

    async def connect(self) -> None:
        refused = await self._authorise()
        # Accept first: a close before the handshake completes carries no code.
        await self.accept()
        if refused is not None:
            await self.close(code=refused)
            return
        await self.channel_layer.group_add(events.GROUP, self.channel_name)
        self.joined = True
        await self._send_snapshot()
        self._recheck = asyncio.create_task(self._watch_credential())
        if isinstance(self.channel_layer, InMemoryChannelLayer):
            self._health_watch = asyncio.create_task(self._watch_health())

    async def disconnect(self, code: int) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._health_watch is not None:
            self._health_watch.cancel()
            self._health_watch = None
        if self.joined:
            await self.channel_layer.group_discard(events.GROUP, self.channel_name)
            self.joined = False

    async def _send_snapshot(self) -> None:
        snapshot = await state_snapshot()
        self._health_seen = {
            name: {key: module[key] for key in UNKNOWN_HEALTH}
            for name, module in snapshot["modules"].items()
        }
        await self.send_json(snapshot)

    async def _watch_health(self) -> None:
        """Send ``module.health`` for every stored result that changed since last seen."""
        while True:
            await asyncio.sleep(self.health_poll_seconds)
            try:
                rows = await database_sync_to_async(health_rows)()
            except Exception:
                log.warning("could not read module health for the live stream", exc_info=True)
                continue
            for module, row in sorted(rows.items()):
                if self._health_seen.get(module) != row:
                    self._health_seen[module] = row
                    await self.send_json({"type": "module.health", "module": module, **row})

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        """Text JSON only; anything else is ignored, like a message we do not understand."""
        if text_data is None:
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if self.joined and isinstance(content, dict) and content.get("type") == "snapshot":
            await self._send_snapshot()

    async def gateway_event(self, message: dict[str, Any]) -> None:
        """A group message ``{"type": "gateway.event", "event": {...}}``: pass it on."""
        event = message.get("event")
        if not (isinstance(event, dict) and self.joined):
            return
        if event.get("type") == "module.health" and isinstance(event.get("module"), str):
            seen = {key: event.get(key, default) for key, default in UNKNOWN_HEALTH.items()}
            self._health_seen[event["module"]] = seen  # the poll need not repeat it
        if event.get("type") == "breaker.transition" and isinstance(event.get("module"), str):
            # The transition says where the breaker went; add what it reads now (failure
            # count, retry_after), so a dashboard needs no second request.
            try:
                event = {
                    **event,
                    "breaker": (await breaker_states([event["module"]]))[event["module"]],
                }
            except Exception:
                log.exception("could not read the breaker for a transition event")
        await self.send_json(event)
