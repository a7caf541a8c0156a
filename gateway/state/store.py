"""Connections to the shared store (Redis), when one is configured.

One asyncio client per event loop (redis-py's asyncio connections belong to the
loop that opened them) and one synchronous client for management code. Store
calls on the request path use short timeouts so a Redis outage never stalls a
request; callers fall back to in-process state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.core.conf import gw
from gateway.core.deadline import answered, default_cap
from gateway.state.loops import PerLoop
from gateway.state.resp import PipelinedRedis

log = logging.getLogger("gateway.store")

_async_clients: PerLoop[aioredis.Redis] = PerLoop()
_script_clients: PerLoop[PipelinedRedis] = PerLoop()
#: Store commands in flight per event loop. Without a gate, a burst of N concurrent requests
#: opens N new connections at once (TCP connect and handshake each), the request-path
#: timeout (``VX11_STORE_TIMEOUT``, 50 ms) expires while they connect, and every process
#: falls back to its own in-process state: a burst of 200 over two hosts admitted up to 157
#: against a global limit of 100, and a half-open breaker let 6 probes through instead of 1
#: (tests/reliability/test_multihost.py). The store is single-threaded: a few warm
#: connections serve a burst in milliseconds. The gate is first come, first served
#: (``asyncio.Semaphore``); redis-py's ``BlockingConnectionPool`` is not, and under
#: sustained concurrency above its size some callers starved past every timeout.
GATE_SIZE = 32
_sync_client: redis.Redis | None = None
_lock = threading.Lock()
#: Where the configuration version lives in Redis (``gateway.config.snapshot``).
VERSION_KEY = "vx11:config:version"


class _GatedRedis(aioredis.Redis):
    """An asyncio client whose commands take turns through a fair gate (``GATE_SIZE``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Semaphore(GATE_SIZE)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        async with self.gate:
            try:
                reply = await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
            except ResponseError:
                answered()  # an error reply is an answer too (NOSCRIPT before a script loads)
                raise
        answered()  # the store is alive: calls waiting behind this one are not charged
        return reply


def redis_url() -> str:
    return gw.redis_url


def shared() -> bool:
    """True when state is shared through Redis (several processes or hosts)."""
    return bool(gw.redis_url)


def _backstop() -> float:
    # Request-path calls are bounded by gateway.core.deadline.store_call (the store
    # timeout, not charged for our own loop's stalls); the socket timeouts are only a
    # backstop and must not cut in first, so they match its wall-time cap.
    return default_cap(max(gw.store_timeout, 0.05))


def _new_async_client() -> aioredis.Redis:
    backstop = _backstop()
    return _GatedRedis.from_url(
        redis_url(),
        socket_timeout=backstop,
        socket_connect_timeout=backstop,
        health_check_interval=0,
        max_connections=256,  # the gate keeps commands to GATE_SIZE; pipelines may add
        driver_info=None,  # no CLIENT SETINFO round trips on each new connection
    )


def async_client() -> aioredis.Redis:
    """This event loop's redis-py client (a new loop reusing a dead one's id: a new one)."""
    return _async_clients.get(_new_async_client)


def _new_script_client() -> PipelinedRedis:
    backstop = _backstop()
    return PipelinedRedis(redis_url(), connect_timeout=backstop, stale_after=backstop)


def script_client() -> PipelinedRedis:
    """The request path's pipelined connection for this event loop (``gateway.state.resp``).

    Rate-limit and breaker decisions run their scripts through it: one connection, every
    call pipelined, ≈ 1/6 of redis-py's CPU per call (``python -m bench.redis_clients``).
    """
    return _script_clients.get(_new_script_client)


def sync_client() -> redis.Redis:
    global _sync_client
    with _lock:
        if _sync_client is None:
            _sync_client = redis.Redis.from_url(
                redis_url(), socket_timeout=0.5, socket_connect_timeout=0.5
            )
        return _sync_client


# --------------------------------------------------------------------------- config version


class LocalVersion:
    """This process's own configuration changes, counted: its snapshot follows them at once.

    Other processes' changes arrive through the carrier (:func:`publish_version`: Redis;
    without Redis the ``ConfigVersion`` row), which ``gateway.config.snapshot`` watches.
    """

    value = 0


def bump_local() -> None:
    with _lock:
        LocalVersion.value += 1


def publish_version() -> None:
    """Announce a change on Redis when it is the carrier (no-op on the embedded default)."""
    if not shared():
        return
    try:
        sync_client().incr(VERSION_KEY)
    except Exception:  # the change is saved; processes catch up at the next change
        log.exception("could not publish the configuration version to Redis")


def read_shared_version() -> int:
    """The version in Redis (raises when Redis does not answer)."""
    raw = sync_client().get(VERSION_KEY)
    return int(raw or 0)


def reset() -> None:
    """Forget every client (tests that switch Redis servers, or after fork)."""
    global _sync_client
    with _lock:
        _async_clients.clear()
        _script_clients.clear()
        _sync_client = None
