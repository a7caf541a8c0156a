"""Circuit breaker: one contract suite over the memory and Redis backends, plus fallback."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio

from gateway.policies.breaker import (
    BreakerBackend,
    BreakerConfig,
    CircuitBreaker,
    FallbackBreakerBackend,
    MemoryBreakerBackend,
    Permit,
    RedisBreakerBackend,
    Transition,
    is_failure,
)
from gateway.state.resp import PipelinedRedis
from tests.conftest import FakeClock
from tests.servers import RedisServer

M = "madre"


@pytest.fixture(params=["memory", "redis", "redis-pipelined"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[BreakerBackend]:
    """The contract runs on memory, on Redis through redis-py, and on Redis through the
    request path's pipelined connection (gateway/state/resp.py)."""
    if request.param == "memory":
        yield MemoryBreakerBackend()
        return
    url = request.getfixturevalue("redis_url")
    client = redis.asyncio.Redis.from_url(url)
    scripts = PipelinedRedis(url) if request.param == "redis-pipelined" else None
    yield RedisBreakerBackend(client, scripts=scripts)
    if scripts is not None:
        await scripts.aclose()
    await client.aclose()


@pytest.fixture
async def redis_clients(redis_url: str) -> AsyncIterator[list[redis.asyncio.Redis]]:
    clients = [redis.asyncio.Redis.from_url(redis_url) for _ in range(2)]
    yield clients
    for client in clients:
        await client.aclose()


def make(
    backend: BreakerBackend, clock: FakeClock, **cfg: Any
) -> tuple[CircuitBreaker, list[Transition]]:
    config = BreakerConfig(**cfg)
    seen: list[Transition] = []
    return CircuitBreaker(backend, lambda _m: config, clock=clock, on_transition=seen.append), seen


async def fail(cb: CircuitBreaker, times: int = 1, status: int = 503, module: str = M) -> None:
    for _ in range(times):
        await cb.record(module, status=status, error=False, probe_id=None)


async def succeed(cb: CircuitBreaker, module: str = M) -> None:
    await cb.record(module, status=200, error=False, probe_id=None)


async def trip(cb: CircuitBreaker, module: str = M) -> None:
    await fail(cb, 3, module=module)
    assert (await cb.status(module)).state == "open"


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [(503, False, True), (500, False, True), (504, False, True), (None, True, True),
     (200, True, True), (404, False, False), (429, False, False), (200, False, False),
     (501, False, False), (None, False, False)],
)  # fmt: skip
def test_it_classifies_failures(status: int | None, error: bool, expected: bool) -> None:
    assert is_failure(BreakerConfig(), status, error) is expected


def test_a_4xx_is_never_a_failure_even_if_configured() -> None:
    cfg = BreakerConfig(failure_statuses=frozenset({429, 503}))
    assert is_failure(cfg, 429, False) is False
    assert is_failure(cfg, 503, False) is True


# --------------------------------------------------------------------------- closed -> open


async def test_it_trips_after_three_503s(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, seen = make(backend, clock)
    for _ in range(3):
        assert (await cb.acquire(M)).allowed
        await fail(cb)
    permit = await cb.acquire(M)
    assert (permit.allowed, permit.state, permit.probe_id) == (False, "open", None)
    assert seen == [Transition(M, "closed", "open", "failure_threshold", clock.now)]


async def test_it_does_not_trip_on_404s(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, seen = make(backend, clock)
    await fail(cb, 10, status=404)
    assert (await cb.acquire(M)).allowed
    assert (await cb.status(M)).failure_count == 0
    assert seen == []


async def test_connect_errors_trip_it(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, _ = make(backend, clock)
    for _ in range(3):
        await cb.record(M, status=None, error=True, probe_id=None)
    assert not (await cb.acquire(M)).allowed


async def test_a_success_resets_the_consecutive_count(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock)
    await fail(cb, 2)
    await succeed(cb)
    await fail(cb, 2)
    status = await cb.status(M)
    assert (status.state, status.failure_count) == ("closed", 2)
    await fail(cb)
    assert (await cb.status(M)).state == "open"


async def test_breakers_are_per_module(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, _ = make(backend, clock)
    await trip(cb, "a")
    assert (await cb.acquire("b")).allowed
    assert not (await cb.acquire("a")).allowed


# --------------------------------------------------------------------------- open


async def test_open_breaker_refuses_with_retry_after_counting_down(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock)
    await trip(cb)
    assert (await cb.acquire(M)).retry_after == pytest.approx(60.0)
    clock.advance(20)
    permit = await cb.acquire(M)
    assert (permit.allowed, permit.state) == (False, "open")
    assert permit.retry_after == pytest.approx(40.0)
    clock.advance(39.5)
    assert (await cb.acquire(M)).retry_after == pytest.approx(0.5)


async def test_it_reads_half_open_after_the_recovery_timeout(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, seen = make(backend, clock)
    await trip(cb)
    clock.advance(59.9)
    assert (await cb.status(M)).state == "open"
    clock.advance(0.1)
    status = await cb.status(M)
    assert (status.state, status.retry_after) == ("half_open", 0.0)
    assert len(seen) == 1  # reading moved nothing


async def test_first_acquire_after_timeout_takes_the_probe(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, seen = make(backend, clock)
    await trip(cb)
    clock.advance(60)
    permit = await cb.acquire(M)
    assert (permit.allowed, permit.state) == (True, "half_open")
    assert permit.probe_id
    assert seen[-1] == Transition(M, "open", "half_open", "recovery_timeout", clock.now)


async def test_a_late_result_while_open_changes_nothing(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, seen = make(backend, clock)
    await trip(cb)
    opened_at = clock.now
    clock.advance(5)
    await succeed(cb)  # a slow call admitted before the trip
    status = await cb.status(M)
    assert (status.state, status.failure_count, status.opened_at) == ("open", 3, opened_at)
    clock.advance(5)
    await fail(cb)
    status = await cb.status(M)
    assert (status.state, status.opened_at, status.last_failure) == ("open", opened_at, clock.now)
    assert len(seen) == 1


# --------------------------------------------------------------------------- half-open


async def test_it_refuses_second_half_open_probe_among_fifty_concurrent(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, seen = make(backend, clock)
    await trip(cb)
    clock.advance(61)
    permits = await asyncio.gather(*(cb.acquire(M) for _ in range(50)))
    allowed = [p for p in permits if p.allowed]
    assert len(allowed) == 1
    assert allowed[0].probe_id
    refused = [p for p in permits if not p.allowed]
    assert {p.state for p in refused} == {"half_open"}
    assert all(0 < p.retry_after <= 1.0 for p in refused)
    assert [t.reason for t in seen] == ["failure_threshold", "recovery_timeout"]


async def test_half_open_admits_up_to_max_calls(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, _ = make(backend, clock, half_open_max_calls=3)
    await trip(cb)
    clock.advance(60)
    permits = await asyncio.gather(*(cb.acquire(M) for _ in range(20)))
    probe_ids = {p.probe_id for p in permits if p.allowed}
    assert len(probe_ids) == 3
    assert None not in probe_ids


async def test_a_probe_holder_that_never_reports_loses_its_lease(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock, probe_lease_seconds=5.0)
    await trip(cb)
    clock.advance(60)
    lost = await cb.acquire(M)
    assert lost.allowed
    clock.advance(4.9)
    assert not (await cb.acquire(M)).allowed
    clock.advance(0.2)
    second = await cb.acquire(M)
    assert second.allowed
    assert second.probe_id != lost.probe_id
    # The first holder's late answer no longer counts; the current holder's does.
    await cb.record(M, status=200, error=False, probe_id=lost.probe_id)
    assert (await cb.status(M)).state == "half_open"
    await cb.record(M, status=200, error=False, probe_id=second.probe_id)
    assert (await cb.status(M)).state == "closed"


async def test_a_released_probe_frees_its_slot_at_once_without_an_outcome(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    """A probe whose client left (or whose request was refused before a byte went out) says
    nothing about the module: its slot is given back now, not when its lease expires."""
    cb, seen = make(backend, clock)
    await trip(cb)
    clock.advance(60)
    probe = await cb.acquire(M)
    assert probe.allowed and probe.probe_id
    assert not (await cb.acquire(M)).allowed
    await cb.release(M, probe)
    status = await cb.status(M)
    assert (status.state, status.failure_count) == ("half_open", 3)
    second = await cb.acquire(M)
    assert second.allowed and second.probe_id != probe.probe_id
    # The released probe's late answer does not count; the new holder's does.
    await cb.record(M, status=200, error=False, probe_id=probe.probe_id)
    assert (await cb.status(M)).state == "half_open"
    await cb.record(M, status=200, error=False, probe_id=second.probe_id)
    assert (await cb.status(M)).state == "closed"
    assert [t.reason for t in seen] == ["failure_threshold", "recovery_timeout", "probe_succeeded"]


async def test_releasing_a_closed_permit_or_an_unknown_probe_changes_nothing(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, seen = make(backend, clock)
    await fail(cb, 2)
    await cb.release(M, await cb.acquire(M))
    await cb.release("never-seen", Permit(True, "half_open", 0.0, "f" * 32))
    status = await cb.status(M)
    assert (status.state, status.failure_count) == ("closed", 2)
    await fail(cb)
    assert (await cb.status(M)).state == "open"
    assert [t.reason for t in seen] == ["failure_threshold"]


async def test_a_failed_probe_reopens(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, seen = make(backend, clock)
    await trip(cb)
    clock.advance(60)
    probe = await cb.acquire(M)
    clock.advance(1)
    await cb.record(M, status=502, error=False, probe_id=probe.probe_id)
    status = await cb.status(M)
    assert (status.state, status.opened_at, status.retry_after) == ("open", clock.now, 60.0)
    assert seen[-1] == Transition(M, "half_open", "open", "probe_failed", clock.now)
    assert not (await cb.acquire(M)).allowed


async def test_a_successful_probe_closes_and_resets_counters(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, seen = make(backend, clock)
    await trip(cb)
    clock.advance(60)
    probe = await cb.acquire(M)
    await cb.record(M, status=200, error=False, probe_id=probe.probe_id)
    status = await cb.status(M)
    assert (status.state, status.failure_count, status.opened_at) == ("closed", 0, None)
    assert seen[-1] == Transition(M, "half_open", "closed", "probe_succeeded", clock.now)
    await fail(cb, 2)
    assert (await cb.acquire(M)).allowed


async def test_success_threshold_two_needs_two_successes(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock, success_threshold=2)
    await trip(cb)
    clock.advance(60)
    first = await cb.acquire(M)
    await cb.record(M, status=200, error=False, probe_id=first.probe_id)
    assert (await cb.status(M)).state == "half_open"
    second = await cb.acquire(M)
    assert second.allowed
    await cb.record(M, status=200, error=False, probe_id=second.probe_id)
    assert (await cb.status(M)).state == "closed"


async def test_a_result_without_a_probe_does_not_close_half_open(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock)
    await trip(cb)
    clock.advance(60)
    assert (await cb.acquire(M)).allowed
    await succeed(cb)
    assert (await cb.status(M)).state == "half_open"


# --------------------------------------------------------------------------- failure rate


def rate_cfg() -> dict[str, Any]:
    return {"failure_threshold": 100, "window_seconds": 10.0, "failure_rate_threshold": 0.5}


async def test_failure_rate_trips_once_min_calls_is_reached(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, seen = make(backend, clock, **rate_cfg())
    for _ in range(4):
        await succeed(cb)
        await fail(cb)
    await succeed(cb)  # 9 calls, 4 failures
    assert (await cb.status(M)).state == "closed"
    await fail(cb)  # 10 calls, 5 failures: 50 %
    assert (await cb.status(M)).state == "open"
    assert seen == [Transition(M, "closed", "open", "failure_rate", clock.now)]


async def test_failure_rate_needs_min_calls(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, _ = make(backend, clock, **rate_cfg(), min_calls=20)
    for _ in range(9):
        await fail(cb)
        await succeed(cb)
    await fail(cb)  # 19 calls at > 50 %
    assert (await cb.status(M)).state == "closed"
    await fail(cb)
    assert (await cb.status(M)).state == "open"


async def test_failure_rate_counts_calls_inside_the_window(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock, **rate_cfg())
    for _ in range(4):
        await fail(cb)
        await succeed(cb)
    await fail(cb)  # 9 calls, 5 failures
    clock.advance(5)
    await fail(cb)  # still in the window: 10 calls, 6 failures
    assert (await cb.status(M)).state == "open"


async def test_failure_rate_forgets_calls_outside_the_window(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock, **rate_cfg())
    for _ in range(4):
        await fail(cb)
        await succeed(cb)
    await fail(cb)
    clock.advance(11)
    await fail(cb)  # the window holds one call
    assert (await cb.status(M)).state == "closed"


# --------------------------------------------------------------------------- manual actions


async def test_force_open_refuses_until_auto(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, seen = make(backend, clock)
    assert await cb.force(M, "force_open") == Transition(
        M, "closed", "open", "force_open", clock.now
    )
    permit = await cb.acquire(M)
    assert (permit.allowed, permit.state, permit.retry_after) == (False, "open", 60.0)
    clock.advance(3600)
    assert not (await cb.acquire(M)).allowed
    status = await cb.status(M)
    assert (status.state, status.forced) == ("open", "open")
    assert await cb.force(M, "auto") == Transition(M, "open", "closed", "auto", clock.now)
    assert (await cb.acquire(M)).allowed
    assert [t.reason for t in seen] == ["force_open", "auto"]


async def test_force_closed_admits_and_never_trips(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock)
    await trip(cb)
    transition = await cb.force(M, "force_closed")
    assert transition == Transition(M, "open", "closed", "force_closed", clock.now)
    await fail(cb, 10)
    assert (await cb.acquire(M)).allowed
    status = await cb.status(M)
    assert (status.state, status.forced) == ("closed", "closed")
    # Back to automatic: the breaker is still in its own (open) state.
    assert await cb.force(M, "auto") == Transition(M, "closed", "open", "auto", clock.now)
    assert not (await cb.acquire(M)).allowed


async def test_auto_without_override_changes_nothing(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock)
    await fail(cb, 2)
    assert await cb.force(M, "auto") is None
    assert (await cb.status(M)).failure_count == 2


async def test_reset_closes_and_clears_everything(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock)
    await trip(cb)
    await cb.force(M, "force_open")
    assert await cb.force(M, "reset") == Transition(M, "open", "closed", "reset", clock.now)
    status = await cb.status(M)
    assert (status.state, status.failure_count, status.opened_at, status.forced) == (
        "closed", 0, None, None,
    )  # fmt: skip
    await fail(cb, 2)
    assert (await cb.status(M)).state == "closed"
    await fail(cb)
    assert (await cb.status(M)).state == "open"


async def test_unknown_action_is_refused(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, _ = make(backend, clock)
    with pytest.raises(ValueError, match="explode"):
        await cb.force(M, "explode")


# --------------------------------------------------------------------------- health checks


async def test_a_passing_health_check_half_opens_early(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, seen = make(backend, clock)
    await trip(cb)
    clock.advance(5)
    assert await cb.mark_healthy(M) == Transition(M, "open", "half_open", "health_check", clock.now)
    probe = await cb.acquire(M)
    assert (probe.allowed, probe.state) == (True, "half_open")
    await cb.record(M, status=200, error=False, probe_id=probe.probe_id)
    assert (await cb.status(M)).state == "closed"
    assert [t.reason for t in seen] == [
        "failure_threshold", "health_check", "probe_succeeded",
    ]  # fmt: skip


async def test_a_health_check_does_not_touch_closed_or_forced_breakers(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock)
    assert await cb.mark_healthy(M) is None
    assert (await cb.status(M)).state == "closed"
    await trip(cb)
    await cb.force(M, "force_open")
    assert await cb.mark_healthy(M) is None
    await cb.force(M, "auto")
    assert (await cb.status(M)).state == "open"


# --------------------------------------------------------------------------- status


async def test_status_has_exactly_the_spec_shape(backend: BreakerBackend, clock: FakeClock) -> None:
    cb, _ = make(backend, clock)
    assert (await cb.status(M)).as_dict() == {
        "state": "closed", "failure_count": 0, "last_failure": None, "opened_at": None,
        "retry_after": 0.0,
    }  # fmt: skip
    clock.advance(0.123)
    await trip(cb)
    clock.advance(10)
    assert (await cb.status(M)).as_dict() == {
        "state": "open", "failure_count": 3, "last_failure": clock.now - 10,
        "opened_at": clock.now - 10, "retry_after": pytest.approx(50.0),
    }  # fmt: skip


async def test_statuses_reports_every_module_asked_for(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb, _ = make(backend, clock)
    await trip(cb, "a")
    await fail(cb, 1, module="b")
    got = await cb.statuses(["a", "b", "c"])
    assert {m: (s.state, s.failure_count) for m, s in got.items()} == {
        "a": ("open", 3), "b": ("closed", 1), "c": ("closed", 0),
    }  # fmt: skip


# --------------------------------------------------------------------------- facade


async def test_a_disabled_breaker_admits_everything(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    cb = CircuitBreaker(backend, lambda _m: BreakerConfig(), clock=clock, enabled=False)
    await fail(cb, 10)
    assert (await cb.acquire(M)).allowed
    assert (await cb.status(M)).failure_count == 0


async def test_a_broken_transition_hook_does_not_fail_the_call(
    backend: BreakerBackend, clock: FakeClock
) -> None:
    def explode(_t: Transition) -> None:
        raise RuntimeError("boom")

    cb = CircuitBreaker(backend, lambda _m: BreakerConfig(), clock=clock, on_transition=explode)
    await fail(cb, 3)
    assert not (await cb.acquire(M)).allowed


# --------------------------------------------------------------------------- Redis: shared


async def test_state_is_shared_between_redis_clients(
    redis_clients: list[redis.asyncio.Redis], clock: FakeClock
) -> None:
    one, _ = make(RedisBreakerBackend(redis_clients[0]), clock)
    two, _ = make(RedisBreakerBackend(redis_clients[1]), clock)
    await trip(one)
    assert not (await two.acquire(M)).allowed


async def test_only_one_probe_across_two_redis_clients(
    redis_clients: list[redis.asyncio.Redis], clock: FakeClock
) -> None:
    breakers = [make(RedisBreakerBackend(c), clock)[0] for c in redis_clients]
    await trip(breakers[0])
    clock.advance(60)
    permits = await asyncio.gather(*(breakers[i % 2].acquire(M) for i in range(50)))
    assert sum(p.allowed for p in permits) == 1


def _acquire_in_child(url: str, now: float, count: int, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: one more gateway process racing for the probe."""

    async def run() -> int:
        client = redis.asyncio.Redis.from_url(url)
        scripts = PipelinedRedis(url)  # what a gateway process decides through
        backend = RedisBreakerBackend(client, scripts=scripts)
        await client.ping()
        await scripts.execute("PING")
        barrier.wait(30)
        permits = await asyncio.gather(
            *(backend.acquire(M, BreakerConfig(), now) for _ in range(count))
        )
        await client.aclose()
        await scripts.aclose()
        return sum(p.allowed for p, _ in permits)

    results.put(asyncio.run(run()))


@pytest.mark.reliability
async def test_only_one_probe_across_two_os_processes(redis_url: str, clock: FakeClock) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    cb, _ = make(RedisBreakerBackend(client), clock)
    await trip(cb)
    await client.aclose()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    now = clock.now + 61
    procs = [
        ctx.Process(target=_acquire_in_child, args=(redis_url, now, 25, barrier, results))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    counts = [await asyncio.to_thread(results.get, True, 60) for _ in procs]
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    assert sorted(counts) == [0, 1]


# --------------------------------------------------------------------------- fallback


def fallback(server: RedisServer, mono: FakeClock) -> tuple[FallbackBreakerBackend, Any]:
    client = redis.asyncio.Redis.from_url(server.url)
    backend = FallbackBreakerBackend(
        RedisBreakerBackend(client), MemoryBreakerBackend(), timeout=0.1, retry_interval=1.0,
        clock=mono,
    )  # fmt: skip
    return backend, client


def redis_has_state(server: RedisServer) -> bool:
    with redis.Redis.from_url(server.url) as sync:
        return bool(sync.exists("vx11:cb:" + M))


@pytest.mark.reliability
async def test_a_dead_redis_falls_back_to_memory_without_stalling(
    own_redis: RedisServer, clock: FakeClock
) -> None:
    backend, client = fallback(own_redis, FakeClock(0.0))
    cb, _ = make(backend, clock)
    assert (await cb.acquire(M)).allowed
    await succeed(cb)
    assert not backend.degraded
    own_redis.kill()
    started = time.perf_counter()
    for _ in range(10):
        assert (await cb.acquire(M)).allowed
        await succeed(cb)
    assert time.perf_counter() - started < 0.5
    assert backend.degraded
    await fail(cb, 3)  # the memory breaker still works
    assert not (await cb.acquire(M)).allowed
    await client.aclose()


@pytest.mark.reliability
async def test_it_returns_to_redis_after_the_retry_interval(
    own_redis: RedisServer, clock: FakeClock
) -> None:
    mono = FakeClock(0.0)
    backend, client = fallback(own_redis, mono)
    cb, _ = make(backend, clock)
    await fail(cb)
    assert redis_has_state(own_redis)
    own_redis.kill()
    await fail(cb)
    assert backend.degraded
    own_redis.start()
    await fail(cb)  # Redis is back, but not retried yet
    assert backend.degraded
    assert not redis_has_state(own_redis)
    mono.advance(1.0)
    await fail(cb)
    assert not backend.degraded
    assert redis_has_state(own_redis)
    assert (await cb.status(M)).failure_count == 1  # answered by Redis' fresh state
    await client.aclose()


async def test_a_success_on_a_clean_closed_breaker_skips_the_store(redis_url):
    """Healthy traffic costs one store round trip (acquire), not two; failures still count."""
    client = redis.asyncio.Redis.from_url(redis_url)
    backend = RedisBreakerBackend(client)
    calls = {"record": 0}
    original = backend.record

    async def counting(*args, **kwargs):
        calls["record"] += 1
        return await original(*args, **kwargs)

    backend.record = counting  # type: ignore[method-assign]
    breaker = CircuitBreaker(backend, lambda m: BreakerConfig())
    permit = await breaker.acquire("madre")
    assert permit.clean
    await breaker.record("madre", status=200, error=False, permit=permit)
    assert calls["record"] == 0
    await breaker.record("madre", status=503, error=False, permit=permit)
    assert calls["record"] == 1
    permit = await breaker.acquire("madre")
    assert not permit.clean  # one failure counted: the next success must reset it
    await breaker.record("madre", status=200, error=False, permit=permit)
    assert calls["record"] == 2
    assert (await breaker.status("madre")).failure_count == 0
    await client.aclose()
