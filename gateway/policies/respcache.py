"""The shared response cache for /shub/health and /shub/ready, with single flight.

SPEC §9: 2xx answers are kept for ``VX11_CACHE_TTL_HEALTH`` seconds in a store
shared by every process, and concurrent misses for one key cause ONE upstream
call across processes. Two layers give that without hammering the store:

* within a process, callers for the same key share one in-flight asyncio future
  (followers cause no store traffic at all);
* across processes, the leader takes a store lock (SET NX PX, random token,
  compare-and-delete release); other processes poll the cache until the value
  appears, the lock is free again (then they take it), or ``wait_timeout``
  passes (then they fetch themselves). The lock's TTL means a holder that dies
  delays the others by at most ``min(lock_ttl, wait_timeout)``, never forever.

A cache must never make a request fail: every store call is bounded by
``store_timeout`` and after a store error the store is left alone for
``retry_interval`` seconds, during which callers fetch directly ("bypass").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import redis.asyncio

from gateway.state.guard import Clock, StoreGuard, StoreUnavailable

#: How a get_or_fetch call was answered (maps onto RFC 9211 Cache-Status):
#: ``hit``: fresh in the cache; ``stored-by-other``: another process held the lock,
#: fetched and stored it while this one waited (a hit, collapsed across processes);
#: ``collapsed``: an in-process follower got the leader's fetched answer;
#: ``miss``: this caller fetched upstream (and stored the answer if cacheable);
#: ``bypass``: the store is unavailable, this caller fetched without it.
Outcome = Literal["hit", "stored-by-other", "collapsed", "miss", "bypass"]

Fetch = Callable[[], Awaitable["CachedResponse | None"]]


@dataclass(frozen=True)
class CachedResponse:
    """A buffered upstream answer plus when it was stored and for how long."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float
    ttl: float

    def age(self, now: float) -> float:
        """Seconds since it was stored (RFC 9111 ``Age``)."""
        return max(now - self.stored_at, 0.0)

    def ttl_left(self, now: float) -> float:
        """Seconds of freshness left (``Cache-Status: ...; ttl=``); 0 once stale."""
        return max(self.ttl - self.age(now), 0.0)

    def is_fresh(self, now: float) -> bool:
        return self.ttl_left(now) > 0


def default_cacheable(response: CachedResponse) -> bool:
    """SPEC §9 keeps 2xx answers only: an error must not be replayed for a minute."""
    return 200 <= response.status < 300


def encode(value: CachedResponse) -> bytes:
    """Compact framing: one JSON line of metadata, then the raw body (no base64 bloat)."""
    meta = {"s": value.status, "h": value.headers, "t": value.stored_at, "l": value.ttl}
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + value.body


def decode(raw: bytes) -> CachedResponse:
    """Inverse of :func:`encode`; JSON never contains a raw newline, so the split is safe."""
    head, _, body = raw.partition(b"\n")
    meta = json.loads(head)
    return CachedResponse(
        status=int(meta["s"]),
        headers=tuple((str(k), str(v)) for k, v in meta["h"]),
        body=body,
        stored_at=float(meta["t"]),
        ttl=float(meta["l"]),
    )


class ResponseCache(Protocol):
    """Storage for cached answers and the cross-process fetch lock."""

    async def get(self, key: str) -> CachedResponse | None: ...

    async def set(self, key: str, value: CachedResponse, ttl: float) -> None: ...

    async def clear(self) -> int: ...

    async def lock(self, key: str, ttl: float) -> str | None: ...

    async def unlock(self, key: str, token: str) -> None: ...


class MemoryResponseCache:
    """Per-process cache (no Redis): entries and locks expire by the injected clock."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._values: dict[str, tuple[CachedResponse, float]] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._mutex = threading.Lock()

    async def get(self, key: str) -> CachedResponse | None:
        with self._mutex:
            entry = self._values.get(key)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._values[key]
                return None
            return entry[0]

    async def set(self, key: str, value: CachedResponse, ttl: float) -> None:
        with self._mutex:
            now = self._clock()
            # Few keys (health, ready) but never let expired ones pile up.
            for stale in [k for k, (_, exp) in self._values.items() if exp <= now]:
                del self._values[stale]
            self._values[key] = (value, now + ttl)

    async def clear(self) -> int:
        with self._mutex:
            count = len(self._values)
            self._values.clear()
            return count

    async def lock(self, key: str, ttl: float) -> str | None:
        with self._mutex:
            held = self._locks.get(key)
            if held is not None and held[1] > self._clock():
                return None
            token = secrets.token_hex(16)
            self._locks[key] = (token, self._clock() + ttl)
            return token

    async def unlock(self, key: str, token: str) -> None:
        with self._mutex:
            held = self._locks.get(key)
            if held is not None and held[0] == token:
                del self._locks[key]


# Delete the lock only if it is still ours: after our TTL ran out another process
# may hold it, and a plain DEL would release *their* lock.
_LUA_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisResponseCache:
    """Shared cache in Redis. Values under ``{prefix}{key}``, locks under ``{prefix}lock:{key}``.

    The client must return bytes (``decode_responses=False``): bodies are binary.
    """

    def __init__(self, client: redis.asyncio.Redis, prefix: str = "vx11:cache:") -> None:
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisResponseCache needs a client with decode_responses=False")
        self._client = client
        self._prefix = prefix
        self._unlock = client.register_script(_LUA_UNLOCK)

    def _lock_key(self, key: str) -> str:
        return f"{self._prefix}lock:{key}"

    async def get(self, key: str) -> CachedResponse | None:
        raw = await self._client.get(self._prefix + key)
        if not isinstance(raw, bytes):
            return None
        try:
            return decode(raw)
        except (ValueError, KeyError, TypeError):
            return None  # a corrupt or foreign value is a miss, not an error

    async def set(self, key: str, value: CachedResponse, ttl: float) -> None:
        await self._client.set(self._prefix + key, encode(value), px=max(int(ttl * 1000), 1))

    async def clear(self) -> int:
        """Delete every key under the prefix (SCAN + UNLINK: never blocks Redis like KEYS)."""
        deleted = 0
        batch: list[bytes | str] = []
        async for found in self._client.scan_iter(match=self._prefix + "*", count=500):
            batch.append(found)
            if len(batch) >= 500:
                deleted += int(await self._client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(await self._client.unlink(*batch))
        return deleted

    async def lock(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(16)
        ok = await self._client.set(self._lock_key(key), token, nx=True, px=max(int(ttl * 1000), 1))
        return token if ok else None

    async def unlock(self, key: str, token: str) -> None:
        await self._unlock(keys=[self._lock_key(key)], args=[token])


class SingleFlight:
    """Cache lookup that collapses concurrent misses into one fetch, in and across processes.

    ``fetch`` returns the upstream answer as a CachedResponse (``stored_at`` and
    ``ttl`` are stamped here), or None when there is nothing to share (e.g. a
    streamed answer the caller could not buffer). Only answers passing
    ``cacheable`` (2xx by default) are stored; an uncacheable answer is still
    handed to in-process followers (it is the upstream's answer to the very same
    GET, and sending them all upstream at once would just multiply load on a
    failing module), while a None makes each follower fetch for itself.

    Counters for the metrics facade: ``hits`` (hit + stored-by-other),
    ``misses`` (miss + bypass: this caller went upstream), ``collapsed``.
    """

    def __init__(
        self,
        cache: ResponseCache,
        *,
        lock_ttl: float = 5.0,
        wait_timeout: float = 5.0,
        poll_interval: float = 0.02,
        store_timeout: float = 0.05,
        retry_interval: float = 1.0,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        cacheable: Callable[[CachedResponse], bool] = default_cacheable,
    ) -> None:
        self.cache = cache
        self.lock_ttl = lock_ttl
        self.wait_timeout = wait_timeout
        self.poll_interval = poll_interval
        self.cacheable = cacheable
        self._clock = clock
        self._monotonic = monotonic
        self._guard = StoreGuard(
            timeout=store_timeout, retry_interval=retry_interval, monotonic=monotonic
        )
        self._inflight: dict[str, asyncio.Future[tuple[CachedResponse | None, Outcome]]] = {}
        self.hits = 0
        self.misses = 0
        self.collapsed = 0

    @property
    def degraded(self) -> bool:
        """True from a store failure until the store answers again."""
        return self._guard.degraded

    async def clear(self) -> int:
        """Empty the cache (``POST /shub/cache/clear``); the store error propagates here."""
        return await self.cache.clear()

    async def get_or_fetch(
        self, key: str, ttl: float, fetch: Fetch
    ) -> tuple[CachedResponse | None, Outcome]:
        """The cached answer for ``key``, or the one fetch that fills it."""
        while (leader := self._inflight.get(key)) is not None:
            try:
                # shield: a follower being cancelled must not cancel the leader's work.
                value, outcome = await asyncio.shield(leader)
            except asyncio.CancelledError:
                if leader.cancelled():
                    continue  # the leader's caller went away: look again, maybe lead
                raise
            if outcome in ("hit", "stored-by-other"):
                self.hits += 1
                return value, outcome
            if value is None:
                # Nothing shareable (and nothing stored): fetch for ourselves.
                return await self._fetch_and_store(key, ttl, fetch), "miss"
            self.collapsed += 1
            return value, "collapsed"

        future: asyncio.Future[tuple[CachedResponse | None, Outcome]] = (
            asyncio.get_running_loop().create_future()
        )
        self._inflight[key] = future
        try:
            result = await self._lead(key, ttl, fetch)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # followers may be none: mark it retrieved
            raise
        else:
            future.set_result(result)
            return result
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    async def _lead(
        self, key: str, ttl: float, fetch: Fetch
    ) -> tuple[CachedResponse | None, Outcome]:
        try:
            cached = await self._guard.call(lambda: self.cache.get(key))
            if cached is not None and cached.is_fresh(self._clock()):
                self.hits += 1
                return cached, "hit"
            deadline = self._monotonic() + self.wait_timeout
            while True:
                token = await self._guard.call(lambda: self.cache.lock(key, self.lock_ttl))
                if token is not None:
                    return await self._fetch_holding_lock(key, ttl, fetch, token)
                if self._monotonic() >= deadline:
                    break  # the holder is slow or dead: do not wait any longer
                await asyncio.sleep(self.poll_interval)
                cached = await self._guard.call(lambda: self.cache.get(key))
                if cached is not None and cached.is_fresh(self._clock()):
                    self.hits += 1
                    return cached, "stored-by-other"
        except StoreUnavailable:
            self.misses += 1
            return await fetch_stamped(fetch, self._clock, ttl), "bypass"
        value = await self._fetch_and_store(key, ttl, fetch)
        return value, "miss"

    async def _fetch_holding_lock(
        self, key: str, ttl: float, fetch: Fetch, token: str
    ) -> tuple[CachedResponse | None, Outcome]:
        try:
            # Re-check under the lock: the previous holder may have stored the
            # value between our last look and our lock.
            try:
                cached = await self._guard.call(lambda: self.cache.get(key))
            except StoreUnavailable:
                cached = None
            if cached is not None and cached.is_fresh(self._clock()):
                self.hits += 1
                return cached, "stored-by-other"
            return await self._fetch_and_store(key, ttl, fetch), "miss"
        finally:
            with contextlib.suppress(StoreUnavailable):  # else the lock's TTL releases it
                await self._guard.call(lambda: self.cache.unlock(key, token))

    async def _fetch_and_store(self, key: str, ttl: float, fetch: Fetch) -> CachedResponse | None:
        self.misses += 1
        value = await fetch_stamped(fetch, self._clock, ttl)
        if value is not None and self.cacheable(value):
            # If the store is down the answer is still good for this request.
            with contextlib.suppress(StoreUnavailable):
                await self._guard.call(lambda: self.cache.set(key, value, ttl))
        return value


async def fetch_stamped(fetch: Fetch, clock: Clock, ttl: float) -> CachedResponse | None:
    """Call ``fetch`` and stamp the answer with when it was stored and its TTL."""
    value = await fetch()
    if value is None:
        return None
    return replace(value, stored_at=clock(), ttl=ttl)
