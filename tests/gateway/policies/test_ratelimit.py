"""The sliding-window rate limiter: one contract suite over the memory and Redis backends."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import redis
import redis.asyncio

from gateway.policies.ratelimit import (
    Decision,
    FailMode,
    MemoryRateLimitBackend,
    RateLimitBackend,
    RateLimiter,
    RedisRateLimitBackend,
    Scope,
    ScopeResult,
    ratelimit_headers,
)
from gateway.state.resp import PipelinedRedis
from tests.conftest import FakeClock
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parents[3]


def token(limit: int, window: int = 60, client: str = "c1") -> Scope:
    return Scope("token", f"token:{client}", limit, window)


@pytest.fixture(params=["memory", "redis", "redis-pipelined"])
async def backend(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[RateLimitBackend]:
    """The contract runs on memory, on Redis through redis-py, and on Redis through the
    request path's pipelined connection (gateway/state/resp.py)."""
    if request.param == "memory":
        yield MemoryRateLimitBackend()
        return
    client: redis.asyncio.Redis | PipelinedRedis
    if request.param == "redis":
        client = redis.asyncio.Redis.from_url(redis_url)
    else:
        client = PipelinedRedis(redis_url)
    yield RedisRateLimitBackend(client)
    await client.aclose()


def limiter(backend: RateLimitBackend, clock: FakeClock, *, enforce: bool = True) -> RateLimiter:
    # A generous store timeout: these tests are about the algorithm, not the fallback.
    return RateLimiter(backend, clock=clock, store_timeout=5.0, enforce=enforce)


async def hits(rl: RateLimiter, scopes: Sequence[Scope], n: int) -> list[Decision]:
    return [await rl.check(scopes) for _ in range(n)]


# --------------------------------------------------------------------------- exactness


async def test_admits_exactly_limit_of_concurrent_requests(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rl = limiter(backend, clock)
    n = 20
    decisions = await asyncio.gather(*(rl.check([token(n)]) for _ in range(3 * n)))
    assert sum(d.allowed for d in decisions) == n
    assert not any(d.degraded for d in decisions)


_CHILD = """
import asyncio, sys, time
from gateway.policies.ratelimit import RateLimiter, RedisRateLimitBackend, Scope
from gateway.state.resp import PipelinedRedis

async def main(url, n, limit, now, start_at):
    client = PipelinedRedis(url)  # what a gateway process decides through
    await client.execute("PING")
    rl = RateLimiter(RedisRateLimitBackend(client), fail_mode="closed", store_timeout=10.0,
                     clock=lambda: now)
    await asyncio.sleep(max(start_at - time.time(), 0))
    scope = Scope("token", "token:shared", limit, 60)
    decisions = await asyncio.gather(*(rl.check([scope]) for _ in range(n)))
    await client.aclose()
    assert not any(d.degraded for d in decisions)
    print(sum(d.allowed for d in decisions))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                 float(sys.argv[5])))
"""


def test_two_processes_together_admit_exactly_limit(redis_url: str) -> None:
    n = 50
    now = 1_700_000_000.0
    start_at = time.time() + 1.5  # both children fire at the same moment
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                redis_url,
                str(3 * n // 2),
                str(n),
                repr(now),
                repr(start_at),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    admitted = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        admitted.append(int(out.strip()))
    assert sum(admitted) == n
    sync = redis.Redis.from_url(redis_url)
    assert sync.zcard("vx11:rl:token:shared") == n
    sync.close()


# --------------------------------------------------------------------------- sliding window


async def test_slot_frees_only_when_its_hit_leaves_the_window(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rl = limiter(backend, clock)
    scope = [token(10)]
    assert (await rl.check(scope)).allowed  # t=0: the first hit
    clock.advance(0.5)
    assert all(d.allowed for d in await hits(rl, scope, 9))  # t=0.5: nine more
    clock.advance(58.5)  # t=59
    refused = await rl.check(scope)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(1.0)
    clock.advance(1.001)  # t=60.001: only the t=0 slot is free
    assert (await rl.check(scope)).allowed
    again = await rl.check(scope)
    assert not again.allowed
    assert again.retry_after == pytest.approx(0.499)


async def test_hit_leaves_the_window_exactly_window_seconds_later(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rl = limiter(backend, clock)
    assert (await rl.check([token(1)])).allowed
    clock.advance(59.999)
    assert not (await rl.check([token(1)])).allowed
    clock.advance(0.001)  # t=60: the window (0, 60] no longer holds the t=0 hit
    assert (await rl.check([token(1)])).allowed


async def test_burst_across_window_boundary_never_exceeds_limit(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rl = limiter(backend, clock)
    n = 10
    scope = [token(n)]
    assert all(d.allowed for d in await hits(rl, scope, n // 2))  # t=0
    clock.advance(30)
    assert all(d.allowed for d in await hits(rl, scope, n // 2))  # t=30
    clock.advance(31)  # t=61: a fixed window would allow n here, the log only n/2
    later = await hits(rl, scope, n)
    assert [d.allowed for d in later] == [True] * (n // 2) + [False] * (n // 2)


async def test_random_traffic_admits_at_most_limit_in_every_window_and_refuses_only_when_full(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rng = random.Random(11)
    n, window = 7, 10
    rl = limiter(backend, clock)
    admitted: list[float] = []
    for _ in range(300):
        clock.advance(rng.choice([0.0, 0.05, 0.3, 1.0, 2.5]))
        now = clock()
        in_window = sum(1 for t in admitted if t > now - window)
        decision = await rl.check([token(n, window)])
        assert decision.allowed == (in_window < n)  # exact: never refuses with room left
        if decision.allowed:
            admitted.append(now)
    for end in admitted:  # every window (end - window, end] ending at an admission
        assert sum(1 for t in admitted if end - window < t <= end) <= n


async def test_refused_request_consumes_nothing(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rl = limiter(backend, clock)
    assert all(d.allowed for d in await hits(rl, [token(5)], 5))
    clock.advance(10)
    assert not any(d.allowed for d in await hits(rl, [token(5)], 50))
    clock.advance(50)  # t=60: the five t=0 hits are gone; the refused t=10 ones never counted
    assert all(d.allowed for d in await hits(rl, [token(5)], 5))


# --------------------------------------------------------------------------- scopes


async def test_refusing_scope_is_named_and_other_scopes_are_not_charged(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rl = limiter(backend, clock)
    scopes = [
        token(100),
        Scope("ip", "ip:10.0.0.1", 500, 60),
        Scope("protected", "protected:c1", 2, 60),
    ]
    assert all(d.allowed for d in await hits(rl, scopes, 2))
    refused = await hits(rl, scopes, 3)
    assert all(d.refused_by == scopes[2] for d in refused)
    assert all(not d.allowed for d in refused)
    status = await rl.status(scopes)
    assert [r.remaining for r in status.results] == [98, 498, 0]


async def test_first_refusing_scope_in_order_is_named_and_retry_waits_for_all(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rl = limiter(backend, clock)
    ip = Scope("ip", "ip:10.0.0.1", 1, 60)
    protected = Scope("protected", "protected:c1", 1, 60)
    assert (await rl.check([protected])).allowed  # t=0
    clock.advance(20)
    assert (await rl.check([ip])).allowed  # t=20
    decision = await rl.check([ip, protected])
    assert decision.refused_by == ip
    assert decision.retry_after == pytest.approx(60.0)  # ip frees at t=80, protected at t=60


async def test_each_admitting_scope_is_charged_when_cost_is_not_all_or_nothing(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    small, big = Scope("protected", "protected:c1", 1, 60), token(10)
    await backend.hit([small], clock())
    decision = await backend.hit([small, big], clock(), cost_only_if_all_allowed=False)
    assert not decision.allowed
    assert [r.remaining for r in decision.results] == [0, 9]


async def test_remaining_and_reset_count_down(backend: RateLimitBackend, clock: FakeClock) -> None:
    rl = limiter(backend, clock)
    scope = [token(3)]
    decisions = []
    for _ in range(4):
        decisions.append(await rl.check(scope))
        clock.advance(10)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.results[0].remaining for d in decisions] == [2, 1, 0, 0]
    assert [d.results[0].reset for d in decisions] == pytest.approx([60.0, 50.0, 40.0, 30.0])
    assert [d.retry_after for d in decisions] == pytest.approx([0.0, 0.0, 0.0, 30.0])


async def test_status_reports_usage_without_consuming(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rl = limiter(backend, clock)
    await hits(rl, [token(3)], 2)
    for _ in range(5):
        status = await rl.status([token(3)])
        assert status.allowed
        assert status.results[0].remaining == 1
    assert (await rl.check([token(3)])).allowed


async def test_lowered_limit_waits_until_count_drops_below_it(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    for _ in range(4):
        await backend.hit([token(10)], clock())
        clock.advance(1)  # hits at t=0, 1, 2, 3; now t=4
    decision = await backend.hit([token(2)], clock())
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(58.0)  # t=2 must leave too: 2 left at t=62


# --------------------------------------------------------------------------- headers


def _decision(
    results: tuple[ScopeResult, ...], refused_by: Scope | None = None, retry_after: float = 0.0
) -> Decision:
    return Decision(refused_by is None, results, refused_by, retry_after)


def test_headers_for_admitted_request_name_most_restrictive_scope() -> None:
    tok, ip = Scope("token", "token:c1", 1000, 60), Scope("ip", "ip:1.2.3.4", 5000, 60)
    headers = ratelimit_headers(
        _decision((ScopeResult(tok, 12, 16.2), ScopeResult(ip, 4000, 59.5)))
    )
    assert headers == [
        ("RateLimit-Policy", '"token";q=1000;w=60, "ip";q=5000;w=60'),
        ("RateLimit", '"token";r=12;t=17'),
        ("X-RateLimit-Limit", "1000"),
        ("X-RateLimit-Remaining", "12"),
        ("X-RateLimit-Reset", "17"),
    ]


def test_headers_for_refused_request_name_refusing_scope_and_retry_after() -> None:
    tok, prot = Scope("token", "token:c1", 1000, 60), Scope("protected", "protected:c1", 100, 60)
    headers = ratelimit_headers(
        _decision(
            (ScopeResult(tok, 0, 3.0), ScopeResult(prot, 0, 41.0000000001)),
            refused_by=prot,
            retry_after=41.0000000001,
        )
    )
    assert headers == [
        ("RateLimit-Policy", '"token";q=1000;w=60, "protected";q=100;w=60'),
        ("RateLimit", '"protected";r=0;t=41'),
        ("X-RateLimit-Limit", "100"),
        ("X-RateLimit-Remaining", "0"),
        ("X-RateLimit-Reset", "41"),
        ("Retry-After", "41"),
    ]


def test_retry_after_is_at_least_one_second() -> None:
    tok = token(1)
    headers = dict(ratelimit_headers(_decision((ScopeResult(tok, 0, 0.2),), tok, 0.2)))
    assert headers["Retry-After"] == "1"
    assert headers["RateLimit"] == '"token";r=0;t=1'


def test_most_restrictive_breaks_ties_on_longest_reset() -> None:
    a, b = Scope("token", "token:c1", 10, 60), Scope("ip", "ip:x", 10, 60)
    d = _decision((ScopeResult(a, 3, 10.0), ScopeResult(b, 3, 20.0)))
    assert d.most_restrictive().scope == b


# --------------------------------------------------------------------------- store failure


StoreClient = redis.asyncio.Redis | PipelinedRedis


@pytest.fixture(params=["redis-py", "pipelined"])
async def own_client(
    request: pytest.FixtureRequest, own_redis: RedisServer
) -> AsyncIterator[StoreClient]:
    """Both clients must survive a store that dies, hangs and comes back."""
    client: StoreClient
    if request.param == "redis-py":
        client = redis.asyncio.Redis.from_url(own_redis.url)
    else:
        client = PipelinedRedis(own_redis.url)
    yield client
    await client.aclose()


async def _redis_limiter(
    client: StoreClient,
    clock: FakeClock,
    fail_mode: FailMode = "local",
    *,
    monotonic: FakeClock | None = None,
    store_timeout: float = 0.05,
) -> RateLimiter:
    rl = RateLimiter(
        RedisRateLimitBackend(client),
        fail_mode=fail_mode,
        clock=clock,
        monotonic=monotonic or time.monotonic,
        store_timeout=store_timeout,
        retry_interval=1.0,
    )
    first = await rl.check([token(1000, client="warmup")])
    assert first.allowed and not first.degraded  # the store really answered before the crash
    return rl


async def test_local_fail_mode_keeps_limiting_quickly_when_redis_dies(
    own_redis: RedisServer, own_client: StoreClient, clock: FakeClock
) -> None:
    rl = await _redis_limiter(own_client, clock, "local")
    own_redis.kill()
    started = time.monotonic()
    decisions = await hits(rl, [token(5)], 20)
    assert time.monotonic() - started < 0.5
    assert all(d.degraded for d in decisions)
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 15
    assert rl.degraded


async def test_open_fail_mode_admits_when_redis_dies(
    own_redis: RedisServer, own_client: StoreClient, clock: FakeClock
) -> None:
    rl = await _redis_limiter(own_client, clock, "open")
    own_redis.kill()
    decisions = await hits(rl, [token(2)], 5)
    assert all(d.allowed and d.degraded for d in decisions)
    assert all(d.results[0].remaining == 2 for d in decisions)


async def test_closed_fail_mode_refuses_when_redis_dies(
    own_redis: RedisServer, own_client: StoreClient, clock: FakeClock
) -> None:
    rl = await _redis_limiter(own_client, clock, "closed")
    own_redis.kill()
    decision = await rl.check([token(100)])
    assert not decision.allowed and decision.degraded
    assert decision.refused_by == token(100)
    assert dict(ratelimit_headers(decision))["Retry-After"] == "1"


async def test_redis_is_used_again_after_restart_and_retry_interval(
    own_redis: RedisServer, own_client: StoreClient, clock: FakeClock
) -> None:
    monotonic = FakeClock(start=0.0)
    rl = await _redis_limiter(own_client, clock, monotonic=monotonic, store_timeout=1.0)
    own_redis.kill()
    assert (await rl.check([token(10)])).degraded
    own_redis.start()
    monotonic.advance(0.5)
    assert (await rl.check([token(10)])).degraded  # still backing off: store not tried
    monotonic.advance(0.6)
    decision = await rl.check([token(10)])
    assert not decision.degraded and not rl.degraded
    sync = redis.Redis.from_url(own_redis.url)
    assert sync.zcard("vx11:rl:token:c1") == 1  # the restarted store got the hit
    sync.close()


class _SlowBackend(MemoryRateLimitBackend):
    async def hit(
        self, scopes: Sequence[Scope], now: float, *, cost_only_if_all_allowed: bool = True
    ) -> Decision:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")


async def test_slow_store_times_out_into_the_fallback(clock: FakeClock) -> None:
    rl = RateLimiter(_SlowBackend(), clock=clock, store_timeout=0.05, fail_mode="local")
    started = time.monotonic()
    decision = await rl.check([token(3)])
    assert time.monotonic() - started < 1.0
    assert decision.allowed and decision.degraded


# --------------------------------------------------------------------------- shadow mode


async def test_shadow_mode_admits_but_reports_it_would_refuse(
    backend: RateLimitBackend, clock: FakeClock
) -> None:
    rl = limiter(backend, clock, enforce=False)
    first, second = await hits(rl, [token(1)], 2)
    assert first.allowed and not first.would_refuse
    assert second.allowed and second.would_refuse
    assert second.refused_by == token(1)
    assert "Retry-After" not in dict(ratelimit_headers(second))
