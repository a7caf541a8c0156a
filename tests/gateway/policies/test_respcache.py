"""The health-answer cache: contract over memory and Redis, and single flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio

from gateway.policies.respcache import (
    CachedResponse,
    MemoryResponseCache,
    RedisResponseCache,
    ResponseCache,
    SingleFlight,
    decode,
    encode,
)
from tests.conftest import FakeClock
from tests.servers import RedisServer

KEY = "GET:/shub/health"


class Upstream:
    """A fake upstream call that counts how often it is reached."""

    def __init__(self, status: int = 200, delay: float = 0.0, *, answer: bool = True) -> None:
        self.status = status
        self.delay = delay
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> CachedResponse | None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self.answer:
            return None
        body = b'{"status": "ok", "n": %d}\n' % self.calls
        return CachedResponse(self.status, (("content-type", "application/json"),), body, 0.0, 0.0)


class CountingCache:
    """Wraps a cache and counts store calls, to show followers cause no store traffic."""

    def __init__(self, inner: ResponseCache) -> None:
        self.inner = inner
        self.calls = 0

    async def get(self, key: str) -> CachedResponse | None:
        self.calls += 1
        return await self.inner.get(key)

    async def set(self, key: str, value: CachedResponse, ttl: float) -> None:
        self.calls += 1
        await self.inner.set(key, value, ttl)

    async def clear(self) -> int:
        return await self.inner.clear()

    async def lock(self, key: str, ttl: float) -> str | None:
        self.calls += 1
        return await self.inner.lock(key, ttl)

    async def unlock(self, key: str, token: str) -> None:
        self.calls += 1
        await self.inner.unlock(key, token)


@pytest.fixture(params=["memory", "redis"])
async def cache(
    request: pytest.FixtureRequest, redis_url: str, clock: FakeClock
) -> AsyncIterator[ResponseCache]:
    if request.param == "memory":
        yield MemoryResponseCache(clock)
        return
    client = redis.asyncio.Redis.from_url(redis_url)
    yield RedisResponseCache(client)
    await client.aclose()


def flight(cache: ResponseCache, clock: FakeClock, wait_timeout: float = 5.0) -> SingleFlight:
    # A generous store timeout: these tests are not about a slow store.
    return SingleFlight(cache, clock=clock, wait_timeout=wait_timeout, store_timeout=5.0)


# --------------------------------------------------------------------------- hit and miss


async def test_miss_then_hit_with_ttl_left_then_miss_after_expiry(
    cache: ResponseCache, clock: FakeClock
) -> None:
    sf = flight(cache, clock)
    upstream = Upstream()
    first, outcome = await sf.get_or_fetch(KEY, 60, upstream)
    assert outcome == "miss"
    assert first is not None and first.stored_at == clock() and first.ttl == 60
    clock.advance(18)
    second, outcome = await sf.get_or_fetch(KEY, 60, upstream)
    assert outcome == "hit"
    assert second == first
    assert second.ttl_left(clock()) == pytest.approx(42)
    assert second.age(clock()) == pytest.approx(18)
    clock.advance(42)
    third, outcome = await sf.get_or_fetch(KEY, 60, upstream)
    assert outcome == "miss"
    assert third is not None and third.body != first.body
    assert upstream.calls == 2
    assert (sf.hits, sf.misses) == (1, 2)


@pytest.mark.parametrize("status", [500, 503, 404, 304])
async def test_non_2xx_answer_is_returned_but_not_stored(
    cache: ResponseCache, clock: FakeClock, status: int
) -> None:
    sf = flight(cache, clock)
    upstream = Upstream(status)
    value, outcome = await sf.get_or_fetch(KEY, 60, upstream)
    assert outcome == "miss" and value is not None and value.status == status
    assert await cache.get(KEY) is None
    await sf.get_or_fetch(KEY, 60, upstream)
    assert upstream.calls == 2


async def test_fetch_returning_none_stores_nothing(cache: ResponseCache, clock: FakeClock) -> None:
    sf = flight(cache, clock)
    value, outcome = await sf.get_or_fetch(KEY, 60, Upstream(answer=False))
    assert (value, outcome) == (None, "miss")
    assert await cache.get(KEY) is None


async def test_keys_are_cached_separately(cache: ResponseCache, clock: FakeClock) -> None:
    sf = flight(cache, clock)
    health, ready = Upstream(), Upstream()
    await sf.get_or_fetch("GET:/shub/health", 60, health)
    _, outcome = await sf.get_or_fetch("GET:/shub/ready", 60, ready)
    assert outcome == "miss"
    assert (health.calls, ready.calls) == (1, 1)


# --------------------------------------------------------------------------- single flight


async def test_concurrent_misses_in_one_process_fetch_once_and_followers_skip_the_store(
    cache: ResponseCache, clock: FakeClock
) -> None:
    counting = CountingCache(cache)
    sf = flight(counting, clock)
    upstream = Upstream(delay=0.1)
    results = await asyncio.gather(*(sf.get_or_fetch(KEY, 60, upstream) for _ in range(20)))
    assert upstream.calls == 1
    assert sorted(o for _, o in results) == ["collapsed"] * 19 + ["miss"]
    assert len({v for v, _ in results}) == 1
    assert counting.calls <= 5  # the leader's get, lock, re-check, set, unlock: nothing more
    assert (sf.misses, sf.collapsed) == (1, 19)


async def test_in_process_followers_share_an_uncacheable_answer(
    cache: ResponseCache, clock: FakeClock
) -> None:
    sf = flight(cache, clock)
    upstream = Upstream(503, delay=0.05)
    results = await asyncio.gather(*(sf.get_or_fetch(KEY, 60, upstream) for _ in range(10)))
    assert upstream.calls == 1
    assert all(v is not None and v.status == 503 for v, _ in results)
    assert await cache.get(KEY) is None


async def test_followers_fetch_themselves_when_the_leader_has_nothing_to_share(
    cache: ResponseCache, clock: FakeClock
) -> None:
    sf = flight(cache, clock)
    upstream = Upstream(delay=0.05, answer=False)
    results = await asyncio.gather(*(sf.get_or_fetch(KEY, 60, upstream) for _ in range(5)))
    assert upstream.calls == 5
    assert all(o == "miss" for _, o in results)


async def test_leader_failure_reaches_followers_and_the_next_call_retries(
    cache: ResponseCache, clock: FakeClock
) -> None:
    sf = flight(cache, clock)

    async def broken() -> CachedResponse | None:
        await asyncio.sleep(0.05)
        raise ConnectionError("upstream down")

    results = await asyncio.gather(
        *(sf.get_or_fetch(KEY, 60, broken) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) for r in results)
    _, outcome = await sf.get_or_fetch(KEY, 60, Upstream())
    assert outcome == "miss"


async def test_concurrent_misses_across_two_processes_fetch_once(
    redis_url: str, clock: FakeClock
) -> None:
    clients = [redis.asyncio.Redis.from_url(redis_url) for _ in range(2)]
    flights = [flight(RedisResponseCache(c), clock) for c in clients]
    upstream = Upstream(delay=0.1)
    results = await asyncio.gather(
        *(flights[i % 2].get_or_fetch(KEY, 60, upstream) for i in range(20))
    )
    for c in clients:
        await c.aclose()
    assert upstream.calls == 1
    outcomes = [o for _, o in results]
    assert outcomes.count("miss") == 1
    assert "stored-by-other" in outcomes
    assert len({v for v, _ in results}) == 1


class LateCache(CountingCache):
    """Its first get misses, as if read just before another process stored the value."""

    async def get(self, key: str) -> CachedResponse | None:
        self.calls += 1
        return None if self.calls == 1 else await self.inner.get(key)


async def test_lock_winner_rechecks_the_cache_before_fetching(
    cache: ResponseCache, clock: FakeClock
) -> None:
    stored = CachedResponse(200, (), b"from the other process", clock(), 60)
    await cache.set(KEY, stored, 60)  # stored (and its lock released) after our first look
    sf = flight(LateCache(cache), clock)
    upstream = Upstream()
    value, outcome = await sf.get_or_fetch(KEY, 60, upstream)
    assert (value, outcome) == (stored, "stored-by-other")
    assert upstream.calls == 0


async def test_waiter_fetches_itself_after_wait_timeout_when_the_holder_died(
    cache: ResponseCache, clock: FakeClock
) -> None:
    assert await cache.lock(KEY, 30) is not None  # a holder that never releases
    sf = flight(cache, clock, wait_timeout=0.2)
    upstream = Upstream()
    started = time.monotonic()
    value, outcome = await asyncio.wait_for(sf.get_or_fetch(KEY, 60, upstream), 2.0)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 1.0
    assert outcome == "miss" and value is not None and upstream.calls == 1
    assert await cache.get(KEY) == value  # stored for everyone else


async def test_waiter_takes_the_lock_once_a_dead_holders_lock_expires(
    redis_url: str, clock: FakeClock
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    cache = RedisResponseCache(client)
    assert await cache.lock(KEY, 0.1) is not None
    sf = flight(cache, clock, wait_timeout=5.0)
    started = time.monotonic()
    _, outcome = await asyncio.wait_for(sf.get_or_fetch(KEY, 60, Upstream()), 2.0)
    assert time.monotonic() - started < 1.0
    assert outcome == "miss"
    await client.aclose()


async def test_unlock_only_releases_the_callers_own_lock(cache: ResponseCache) -> None:
    token = await cache.lock(KEY, 30)
    assert token is not None
    assert await cache.lock(KEY, 30) is None
    await cache.unlock(KEY, "someone-else")
    assert await cache.lock(KEY, 30) is None
    await cache.unlock(KEY, token)
    assert await cache.lock(KEY, 30) is not None


# --------------------------------------------------------------------------- clear


async def test_clear_deletes_every_cached_answer_and_returns_the_count(
    cache: ResponseCache, clock: FakeClock
) -> None:
    sf = flight(cache, clock)
    for path in ("health", "ready", "openapi.json"):
        await sf.get_or_fetch(f"GET:/shub/{path}", 60, Upstream())
    assert await cache.clear() == 3
    assert await cache.get("GET:/shub/health") is None
    assert await cache.clear() == 0


async def test_redis_clear_scans_in_batches_and_spares_other_keys(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    await client.set("vx11:rl:token:c1", "1")
    await client.mset({f"vx11:cache:k{i}": "x" for i in range(1234)})
    assert await RedisResponseCache(client).clear() == 1234
    assert await client.dbsize() == 1
    await client.aclose()


def test_encoding_round_trips_binary_bodies() -> None:
    value = CachedResponse(200, (("content-type", "a\nb"), ("x", '"q"')), b"\x00\n\xff\n", 1.5, 60)
    assert decode(encode(value)) == value


# --------------------------------------------------------------------------- store failure


async def test_redis_down_still_answers_quickly_with_the_fetched_value(
    own_redis: RedisServer, clock: FakeClock
) -> None:
    client = redis.asyncio.Redis.from_url(own_redis.url)
    sf = SingleFlight(RedisResponseCache(client), clock=clock)
    _, outcome = await sf.get_or_fetch(KEY, 60, Upstream())
    assert outcome == "miss"
    own_redis.kill()
    upstream = Upstream()
    started = time.monotonic()
    results = [await sf.get_or_fetch(KEY, 60, upstream) for _ in range(10)]
    assert time.monotonic() - started < 0.5
    assert [o for _, o in results] == ["bypass"] * 10
    assert [v.body if v else None for v, _ in results] == [
        b'{"status": "ok", "n": %d}\n' % n for n in range(1, 11)
    ]
    assert sf.degraded
    await client.aclose()


async def test_cache_is_used_again_after_redis_restarts(
    own_redis: RedisServer, clock: FakeClock
) -> None:
    monotonic = FakeClock(start=0.0)
    client = redis.asyncio.Redis.from_url(own_redis.url)
    sf = SingleFlight(
        RedisResponseCache(client),
        clock=clock,
        monotonic=monotonic,
        store_timeout=1.0,
        retry_interval=1.0,
    )
    own_redis.kill()
    assert (await sf.get_or_fetch(KEY, 60, Upstream()))[1] == "bypass"
    own_redis.start()
    assert (await sf.get_or_fetch(KEY, 60, Upstream()))[1] == "bypass"  # still backing off
    monotonic.advance(1.1)
    assert (await sf.get_or_fetch(KEY, 60, Upstream()))[1] == "miss"
    assert (await sf.get_or_fetch(KEY, 60, Upstream()))[1] == "hit"
    assert not sf.degraded
    await client.aclose()
