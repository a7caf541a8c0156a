"""Who probes: the health checkers' leader lease.

With Redis, one checker in the whole deployment, the holder of a lease (``SET NX PX`` with
a random token, renewed by a compare-and-renew script, released on shutdown). A standby
checker retries every renewal period and takes over once the lease expires, within
``lease_ttl`` + one renewal period (3 s + 1 s by default: less than one healthy interval).
Without Redis the worker is the leader (:class:`LocalLease`).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.core.clock import Clock

log = logging.getLogger("gateway.health")

LEASE_KEY = "vx11:health:leader"


class Lease(Protocol):
    held: bool

    async def hold(self) -> bool: ...

    async def release(self) -> None: ...


class LocalLease:
    """No shared store: this worker is the only checker, so always the leader."""

    held = True

    async def hold(self) -> bool:
        return True

    async def release(self) -> None:
        return None


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLease:
    """Leadership as a Redis key holding our random token, with a TTL.

    ``hold()`` renews the lease when we have it (only if the key still holds our token)
    and tries to take it otherwise. If Redis cannot be reached we stop believing we lead
    once ``ttl`` has passed since the last successful renewal (``clock``: monotonic),
    because by then another checker may have taken over.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        key: str = LEASE_KEY,
        ttl: float = 3.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.client = client
        self.key = key
        self.ttl = ttl
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.held = False
        self._valid_until = 0.0
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def hold(self) -> bool:
        started = self.clock()
        try:
            ok = False
            if self.held:
                ok = bool(await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
            if not ok:
                ok = bool(await self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        except (RedisError, OSError) as exc:
            if self.held and self.clock() >= self._valid_until:
                self._change(False, f"store unreachable: {type(exc).__name__}")
            return self.held
        if ok:
            self._valid_until = started + self.ttl
        self._change(ok, "renewal failed: another checker holds the lease")
        return self.held

    def _change(self, held: bool, why: str) -> None:
        if held and not self.held:
            log.info("health-check leader lease acquired", extra={"lease": self.key})
        elif self.held and not held:
            log.warning("health-check leader lease lost", extra={"lease": self.key, "why": why})
        self.held = held

    async def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            await self._release(keys=[self.key], args=[self.token])
            log.info("health-check leader lease released", extra={"lease": self.key})
        except (RedisError, OSError):
            log.warning("could not release the health-check lease; it expires by itself")


__all__ = ["LEASE_KEY", "Lease", "LocalLease", "RedisLease"]
