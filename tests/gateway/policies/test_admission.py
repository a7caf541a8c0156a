"""Rate limit + breaker peek in one store round trip (gateway/policies/admission.py).

Against a real Redis; the combined answer must be exactly what the two policies give
when called one after the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio

from gateway.policies.admission import Admission
from gateway.policies.breaker import (
    BreakerConfig,
    CircuitBreaker,
    FallbackBreakerBackend,
    MemoryBreakerBackend,
    RedisBreakerBackend,
)
from gateway.policies.ratelimit import FailMode, RateLimiter, RedisRateLimitBackend, Scope
from gateway.state.memory import MemoryAdmission, MemoryRateLimitBackend
from gateway.state.redis_store import combined
from gateway.state.resp import PipelinedRedis
from tests.conftest import FakeClock
from tests.servers import RedisServer

M = "switch"


@dataclass
class Parts:
    admission: Admission
    limiter: RateLimiter
    breaker: CircuitBreaker
    fallback: FallbackBreakerBackend
    scripts: PipelinedRedis


async def build(
    url: str,
    clock: FakeClock,
    *,
    enforce: bool = True,
    fail_mode: FailMode = "local",
    store_timeout: float = 5.0,
) -> Parts:
    client = redis.asyncio.Redis.from_url(url)
    scripts = PipelinedRedis(url)
    fallback = FallbackBreakerBackend(
        RedisBreakerBackend(client, scripts=scripts),
        MemoryBreakerBackend(),
        timeout=store_timeout,
    )
    breaker = CircuitBreaker(fallback, lambda _m: BreakerConfig(), clock=clock)
    limiter = RateLimiter(
        RedisRateLimitBackend(scripts),
        clock=clock,
        enforce=enforce,
        fail_mode=fail_mode,
        store_timeout=store_timeout,
    )
    return Parts(Admission(limiter, breaker), limiter, breaker, fallback, scripts)


@pytest.fixture
async def parts(redis_url: str, clock: FakeClock) -> AsyncIterator[Parts]:
    built = await build(redis_url, clock)
    yield built
    await built.scripts.aclose()


def scope(limit: int) -> list[Scope]:
    return [Scope("token", "token:c1", limit, 60), Scope("ip", "ip:10.0.0.1", 10**6, 60)]


async def trip(breaker: CircuitBreaker) -> None:
    for _ in range(3):
        await breaker.record(M, status=503, error=False)
    assert (await breaker.status(M)).state == "open"


async def test_a_closed_breaker_answers_with_the_rate_limit(parts: Parts) -> None:
    admitted = await parts.admission.admit(scope(5), M)
    assert admitted.decision.allowed
    assert admitted.permit is not None
    assert admitted.permit.allowed and admitted.permit.state == "closed"
    assert admitted.permit.clean  # a success then needs no store call at all


async def test_after_a_failure_the_closed_permit_is_not_clean(parts: Parts) -> None:
    await parts.breaker.record(M, status=503, error=False)
    admitted = await parts.admission.admit(scope(5), M)
    assert admitted.permit is not None
    assert admitted.permit.allowed and not admitted.permit.clean


async def test_an_open_breaker_is_refused_in_the_same_round_trip(
    parts: Parts, clock: FakeClock
) -> None:
    await trip(parts.breaker)
    clock.advance(10)
    admitted = await parts.admission.admit(scope(5), M)
    assert admitted.decision.allowed
    assert admitted.permit is not None and not admitted.permit.allowed
    assert admitted.permit.state == "open"
    assert admitted.permit.retry_after == pytest.approx(50.0)


async def test_a_breaker_due_for_a_probe_is_left_to_acquire(parts: Parts, clock: FakeClock) -> None:
    """The move to half-open and the probe lease need writes: never taken by a peek."""
    await trip(parts.breaker)
    clock.advance(61)
    admitted = await parts.admission.admit(scope(5), M)
    assert admitted.permit is None
    stored = await parts.scripts.execute("HGET", "vx11:cb:" + M, "state")
    assert stored == b"open"  # nothing moved, no lease taken
    assert await parts.scripts.execute("EXISTS", "vx11:cb:" + M + ":probes") == 0
    permits = await asyncio.gather(*(parts.breaker.acquire(M) for _ in range(10)))
    assert sum(p.allowed for p in permits) == 1


async def test_a_refused_request_gets_no_permit_and_is_counted_once(parts: Parts) -> None:
    for _ in range(2):
        assert (await parts.admission.admit(scope(2), M)).decision.allowed
    refused = await parts.admission.admit(scope(2), M)
    assert not refused.decision.allowed
    assert refused.decision.refused_by == scope(2)[0]
    assert refused.permit is None
    status = await parts.limiter.status(scope(2))
    assert status.results[0].remaining == 0
    assert status.results[1].remaining == 10**6 - 2  # the refused request charged nothing


async def test_exactly_the_limit_is_admitted_out_of_three_times_as_many(parts: Parts) -> None:
    decisions = await asyncio.gather(*(parts.admission.admit(scope(50), M) for _ in range(150)))
    assert sum(a.decision.allowed for a in decisions) == 50
    assert all((a.permit is not None) == a.decision.allowed for a in decisions)


async def test_shadow_mode_admits_and_still_peeks_the_breaker(
    redis_url: str, clock: FakeClock
) -> None:
    parts = await build(redis_url, clock, enforce=False)
    for _ in range(3):
        await parts.admission.admit(scope(2), M)
    shadowed = await parts.admission.admit(scope(2), M)
    await parts.scripts.aclose()
    assert shadowed.decision.allowed and shadowed.decision.would_refuse
    assert shadowed.permit is not None and shadowed.permit.allowed


async def test_without_a_module_only_the_rate_limit_is_decided(parts: Parts) -> None:
    admitted = await parts.admission.admit(scope(5), None)
    assert admitted.decision.allowed and admitted.permit is None


async def test_a_dead_store_falls_back_for_both_policies(
    own_redis: RedisServer, clock: FakeClock
) -> None:
    parts = await build(own_redis.url, clock, store_timeout=0.05, fail_mode="local")
    assert (await parts.admission.admit(scope(3), M)).permit is not None
    own_redis.kill()
    results = [await parts.admission.admit(scope(3), M) for _ in range(5)]
    assert all(r.decision.degraded for r in results)
    assert [r.decision.allowed for r in results] == [True] * 3 + [False] * 2  # local limits
    assert all(r.permit is None for r in results)
    assert parts.fallback.degraded  # the breaker knows too: memory until the store is back
    permit = await parts.breaker.acquire(M)
    assert permit.allowed
    await parts.scripts.aclose()


async def test_memory_backends_decide_separately(clock: FakeClock) -> None:
    breaker = CircuitBreaker(MemoryBreakerBackend(), lambda _m: BreakerConfig(), clock=clock)
    limiter = RateLimiter(MemoryRateLimitBackend(), clock=clock)
    admitted = await Admission(limiter, breaker).admit(scope(1), M)
    assert admitted.decision.allowed and admitted.permit is None
    assert not (await Admission(limiter, breaker).admit(scope(1), M)).decision.allowed


async def test_the_memory_store_admits_by_the_rate_limit_and_leaves_the_breaker_alone(
    clock: FakeClock,
) -> None:
    """The memory implementation of the combined admission (gateway.state.base)."""
    store = MemoryAdmission(MemoryRateLimitBackend())
    decision, permit = await store.admit(scope(1), 1.0, M, BreakerConfig(), 1.0, shadow=False)
    assert decision.allowed and permit is None
    decision, permit = await store.admit(scope(1), 1.0, M, BreakerConfig(), 1.0, shadow=False)
    assert not decision.allowed and permit is None


def test_a_combined_admission_needs_one_shared_store(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    one, other = PipelinedRedis(redis_url), PipelinedRedis(redis_url)
    breakers = RedisBreakerBackend(client, scripts=one)
    assert combined(RedisRateLimitBackend(one), breakers) is not None
    assert combined(RedisRateLimitBackend(other), breakers) is None
    assert combined(MemoryRateLimitBackend(), MemoryBreakerBackend()) is None
