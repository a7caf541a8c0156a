"""Connections to the shared store (Redis), when one is configured.

One asyncio client per event loop (redis-py's asyncio connections belong to the
loop that opened them) and one synchronous client for management code. Store
calls on the request path use short timeouts so a Redis outage never stalls a
request; callers fall back to in-process state.
"""

from __future__ import annotations

import asyncio
import threading

import redis
import redis.asyncio as aioredis

from gateway.conf import gw

_async_clients: dict[int, aioredis.Redis] = {}
_sync_client: redis.Redis | None = None
_lock = threading.Lock()


def redis_url() -> str:
    return str(gw.redis_url)


def shared() -> bool:
    """True when state is shared through Redis (several processes or hosts)."""
    return bool(gw.redis_url)


def async_client() -> aioredis.Redis:
    loop = asyncio.get_running_loop()
    key = id(loop)
    client = _async_clients.get(key)
    if client is None:
        timeout = max(float(gw.store_timeout), 0.05)
        client = aioredis.Redis.from_url(
            redis_url(),
            socket_timeout=timeout * 4,
            socket_connect_timeout=timeout * 4,
            health_check_interval=0,
            max_connections=256,
        )
        _async_clients[key] = client
    return client


def sync_client() -> redis.Redis:
    global _sync_client
    with _lock:
        if _sync_client is None:
            _sync_client = redis.Redis.from_url(
                redis_url(), socket_timeout=0.5, socket_connect_timeout=0.5
            )
        return _sync_client


def reset() -> None:
    """Forget every client (tests that switch Redis servers, or after fork)."""
    global _sync_client
    with _lock:
        _async_clients.clear()
        _sync_client = None
