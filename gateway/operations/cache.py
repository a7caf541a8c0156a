"""Cache operations: empty the shared health cache the proxy serves from.

``POST /shub/cache/clear`` (``gateway.api.edge``), the dashboard's button, the admin's
page and ``manage.py clear_gateway_cache`` all call :func:`clear_cache` or
:func:`clear_cache_sync`.
"""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import async_to_sync

from gateway.core.problems import UpstreamUnavailable
from gateway.operations import events, registry
from gateway.policies.ratelimit import STORE_ERRORS

log = logging.getLogger("gateway.edge")
CLEAR_TIMEOUT = 5.0  # seconds: a Redis outage answers 503 instead of hanging the caller


class CacheStoreUnavailable(UpstreamUnavailable):
    """The shared cache could not be reached, so nothing was cleared."""

    title = "Cache store unavailable"


async def _clear_store() -> int:
    try:
        return await asyncio.wait_for(registry.get().cache.clear(), CLEAR_TIMEOUT)
    except STORE_ERRORS as exc:
        raise CacheStoreUnavailable(
            f"The shared cache did not answer ({type(exc).__name__}); nothing was cleared."
        ) from None


def _cleared(deleted: int, source: str) -> None:
    log.info("gateway cache cleared", extra={"keys_deleted": deleted, "source": source})
    events.emit({"type": "cache.cleared", "keys_deleted": deleted, "source": source})


async def clear_cache(source: str) -> int:
    """Empty the shared health cache (the one the proxy serves from); emit ``cache.cleared``.

    Raises :class:`CacheStoreUnavailable` when the store does not answer in time.
    """
    deleted = await _clear_store()
    _cleared(deleted, source)
    return deleted


def clear_cache_sync(source: str) -> int:
    """:func:`clear_cache` for sync callers (management command, admin view).

    Inside the ASGI server ``async_to_sync`` runs the clear on the server's loop;
    the event is emitted here, from sync code, so it is published before returning
    (a queued event would die with a command's private loop).
    """
    deleted = int(async_to_sync(_clear_store)())
    _cleared(deleted, source)
    return deleted
