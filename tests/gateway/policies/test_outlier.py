"""Passive outlier ejection: one contract suite over the memory and Redis stores, plus the
per-process detector (what it reports, its cached view) and the fallback."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from gateway.policies.outlier import (
    FallbackOutlierStore,
    OutlierDetector,
    is_gateway_failure,
)
from gateway.state.base import OutlierStore
from gateway.state.ejections import (
    ACTIVE_PROBE,
    CONSECUTIVE_FAILURES,
    EXPIRED,
    Ejection,
    OutlierConfig,
)
from gateway.state.memory import MemoryOutlierStore
from gateway.state.redis_outliers import RedisOutlierStore
from gateway.state.resp import PipelinedRedis
from tests.conftest import FakeClock
from tests.servers import free_port

M = "switch"
A, B, C, D = "10.0.0.1:8002", "10.0.0.2:8002", "10.0.0.3:8002", "10.0.0.4:8002"
CFG = OutlierConfig(jitter=0.0)  # 5 failures, 30 s × count, 300 s cap, 50 %


@pytest.fixture(params=["memory", "redis", "redis-pipelined"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[OutlierStore]:
    """Memory, Redis through redis-py, Redis through the request path's pipelined connection."""
    if request.param == "memory":
        yield MemoryOutlierStore()
        return
    url = request.getfixturevalue("redis_url")
    if request.param == "redis":
        client = redis.asyncio.Redis.from_url(url)
        yield RedisOutlierStore(client)
        await client.aclose()
        return
    pipelined = PipelinedRedis(url)
    yield RedisOutlierStore(pipelined)
    await pipelined.aclose()


async def fail(
    store: OutlierStore,
    clock: FakeClock,
    target: str = A,
    times: int = 5,
    *,
    n: int = 3,
    cfg: OutlierConfig = CFG,
    stretch: float = 1.0,
) -> Ejection | None:
    """``times`` failures of ``target``; the last result."""
    event = None
    for _ in range(times):
        event = await store.record(
            M, target, clock.now, cfg, failure=True, n_targets=n, stretch=stretch
        )
    return event


async def succeed(store: OutlierStore, clock: FakeClock, target: str = A) -> None:
    assert (
        await store.record(M, target, clock.now, CFG, failure=False, n_targets=3, stretch=1.0)
    ) is None


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [(502, False, True), (503, False, True), (504, False, True), (None, True, True),
     (500, False, False), (501, False, False), (404, False, False), (200, False, False),
     (None, False, False)],
)  # fmt: skip
def test_gateway_failures(status: int | None, error: bool, expected: bool) -> None:
    assert is_gateway_failure(status, error) is expected


def test_the_config_math() -> None:
    assert [CFG.duration(n, 1.0) for n in (1, 2, 10, 11)] == [30.0, 60.0, 300.0, 300.0]
    assert CFG.duration(1, 1.1) == pytest.approx(33.0)
    assert CFG.max_count == 10
    assert (CFG.allows(0, 1), CFG.allows(1, 3), CFG.allows(1, 4), CFG.allows(2, 4)) == (
        True,
        False,
        True,
        False,
    )


# --------------------------------------------------------------------------- the contract


async def test_it_ejects_after_five_consecutive_failures(
    store: OutlierStore, clock: FakeClock
) -> None:
    assert await fail(store, clock, times=4) is None
    assert (await store.outliers(M, clock.now, CFG)).failing == {A: 4}
    event = await fail(store, clock, times=1)
    assert event == Ejection(M, A, True, clock.now + 30.0, 1, CONSECUTIVE_FAILURES, clock.now)
    seen = await store.outliers(M, clock.now, CFG)
    assert (seen.ejected, seen.failing, seen.ejections) == ({A: clock.now + 30.0}, {}, {A: 1})
    clock.advance(29.9)
    assert A in (await store.outliers(M, clock.now, CFG)).ejected
    clock.advance(0.2)
    assert (await store.outliers(M, clock.now, CFG)).ejected == {}


async def test_a_success_in_between_resets_the_count(store: OutlierStore, clock: FakeClock) -> None:
    await fail(store, clock, times=4)
    await succeed(store, clock)
    assert (await store.outliers(M, clock.now, CFG)).failing == {}
    assert await fail(store, clock, times=4) is None
    assert await fail(store, clock, times=1) is not None


async def test_results_while_ejected_change_nothing(store: OutlierStore, clock: FakeClock) -> None:
    first = await fail(store, clock)
    assert first is not None
    clock.advance(1)
    assert await fail(store, clock, times=12) is None
    seen = await store.outliers(M, clock.now, CFG)
    assert (seen.ejected, seen.failing) == ({A: first.until}, {})


async def test_the_duration_grows_with_the_count_up_to_the_cap(
    store: OutlierStore, clock: FakeClock
) -> None:
    cfg = OutlierConfig(base_ejection=30.0, max_ejection=100.0, jitter=0.0)
    durations = []
    for _ in range(6):
        event = await fail(store, clock, cfg=cfg)
        assert event is not None
        durations.append(event.until - clock.now)
        clock.now = event.until + 0.5  # back, and failing again before any decay
    assert durations == pytest.approx([30.0, 60.0, 90.0, 100.0, 100.0, 100.0])
    assert (await store.outliers(M, clock.now, cfg)).ejections == {A: 4}  # count capped


async def test_the_jitter_lengthens_within_its_bound(store: OutlierStore, clock: FakeClock) -> None:
    event = await fail(store, clock, stretch=1.0 + 0.1 * 0.999)
    assert event is not None
    assert event.until - clock.now == pytest.approx(30.0 * 1.0999)
    assert (await store.outliers(M, clock.now, CFG)).ejected == {A: event.until}


async def test_max_ejection_percent_with_three_targets(
    store: OutlierStore, clock: FakeClock
) -> None:
    assert await fail(store, clock, A) is not None
    assert await fail(store, clock, B) is None  # 2 of 3 would be 67 % > 50 %
    assert await fail(store, clock, B, times=7) is None
    seen = await store.outliers(M, clock.now, CFG)
    assert (set(seen.ejected), seen.failing) == ({A}, {B: 12})
    clock.advance(31)  # A is back: B's next failure ejects it
    event = await fail(store, clock, B, times=1)
    assert event is not None and event.target == B


async def test_max_ejection_percent_with_four_targets(
    store: OutlierStore, clock: FakeClock
) -> None:
    assert await fail(store, clock, A, n=4) is not None
    assert await fail(store, clock, B, n=4) is not None  # 2 of 4 = 50 %
    assert await fail(store, clock, C, n=4) is None
    assert set((await store.outliers(M, clock.now, CFG)).ejected) == {A, B}


async def test_a_lone_target_may_be_ejected(store: OutlierStore, clock: FakeClock) -> None:
    event = await fail(store, clock, A, n=1)
    assert event is not None and event.until == clock.now + 30.0


async def test_the_count_decays_while_the_target_stays_in(
    store: OutlierStore, clock: FakeClock
) -> None:
    first = await fail(store, clock)
    assert first is not None
    clock.now = first.until + 1
    second = await fail(store, clock)
    assert second is not None and second.count == 2
    assert second.until == clock.now + 60.0
    clock.now = second.until + 29.0
    assert (await store.outliers(M, clock.now, CFG)).ejections == {A: 2}
    clock.now = second.until + 30.0  # one base_ejection un-ejected: one less
    assert (await store.outliers(M, clock.now, CFG)).ejections == {A: 1}
    third = await fail(store, clock)  # 2 - 1 decayed + this one
    assert third is not None and (third.count, third.until) == (2, clock.now + 60.0)
    clock.now = third.until + 45.0
    await succeed(store, clock)  # a write in the middle of the decay
    assert (await store.outliers(M, clock.now, CFG)).ejections == {A: 1}
    clock.now = third.until + 59.0
    assert await fail(store, clock, times=4) is None
    clock.now = third.until + 60.0
    assert (await store.outliers(M, clock.now, CFG)).ejections == {}
    fourth = await fail(store, clock, times=1)  # the failure that sees the full decay
    assert fourth is not None and (fourth.count, fourth.until) == (1, clock.now + 30.0)


async def test_a_passing_probe_returns_a_target_early(
    store: OutlierStore, clock: FakeClock
) -> None:
    assert await store.return_early(M, A, clock.now, CFG) is None  # not ejected
    assert await fail(store, clock) is not None
    clock.advance(5)
    event = await store.return_early(M, A, clock.now, CFG)
    assert event == Ejection(M, A, False, clock.now, 1, ACTIVE_PROBE, clock.now)
    seen = await store.outliers(M, clock.now, CFG)
    assert (seen.ejected, seen.ejections) == ({}, {A: 1})
    assert await store.return_early(M, A, clock.now, CFG) is None
    clock.advance(1)
    again = await fail(store, clock)
    assert again is not None and again.until == clock.now + 60.0  # the count went on
    assert await store.return_early(M, A, clock.now, CFG) is not None
    clock.advance(29)
    assert (await store.outliers(M, clock.now, CFG)).ejections == {A: 2}
    clock.advance(1)  # the decay runs from the early return, not from the planned end
    assert (await store.outliers(M, clock.now, CFG)).ejections == {A: 1}


async def test_modules_are_separate(store: OutlierStore, clock: FakeClock) -> None:
    await fail(store, clock)
    assert (await store.outliers("madre", clock.now, CFG)).ejected == {}


async def test_two_processes_share_one_ejection(redis_url: str, clock: FakeClock) -> None:
    """Two stores on one Redis (two processes or hosts): failures seen by either count
    together, and the ejection is the same for both."""
    one, two = PipelinedRedis(redis_url), redis.asyncio.Redis.from_url(redis_url)
    first, second = RedisOutlierStore(one), RedisOutlierStore(two)
    try:
        assert await fail(first, clock, times=3) is None
        event = await fail(second, clock, times=2)
        assert event is not None
        assert (await first.outliers(M, clock.now, CFG)).ejected == {A: event.until}
        assert await fail(first, clock, B) is None  # the cap counts the other's ejection
        ttl = await two.ttl("vx11:od:" + M)
        assert 0 < ttl <= CFG.ttl
    finally:
        await one.aclose()
        await two.aclose()


# --------------------------------------------------------------------------- the detector


def detector(
    store: OutlierStore, clock: FakeClock, seen: list[Ejection] | None = None
) -> OutlierDetector:
    return OutlierDetector(
        store,
        OutlierConfig(),
        clock=clock,
        rng=random.Random(11),
        on_event=None if seen is None else seen.append,
    )


async def evalsha_calls(client: redis.asyncio.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
        stats.get("cmdstat_eval", {}).get("calls", 0)
    )


async def test_a_healthy_request_makes_no_store_call(redis_url: str, clock: FakeClock) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        det = detector(RedisOutlierStore(client), clock)
        before = await evalsha_calls(client)
        for _ in range(50):
            assert await det.record(M, A, failure=False, n_targets=3) is None
        assert await evalsha_calls(client) == before
        await det.record(M, A, failure=True, n_targets=3)
        await det.record(M, A, failure=False, n_targets=3)  # the first success after it
        await det.record(M, A, failure=False, n_targets=3)
        assert await evalsha_calls(client) == before + 2
    finally:
        await client.aclose()


async def test_a_success_another_process_sees_resets_the_shared_count(
    redis_url: str, clock: FakeClock
) -> None:
    one, two = PipelinedRedis(redis_url), PipelinedRedis(redis_url)
    try:
        first, second = (
            detector(RedisOutlierStore(one), clock),
            detector(RedisOutlierStore(two), clock),
        )
        for _ in range(4):
            await first.record(M, A, failure=True, n_targets=3)
        assert (await second.reload(M)).failing == {A: 4}
        assert second.suspect(M, A)
        await second.record(M, A, failure=False, n_targets=3)  # reported: A is failing
        assert await first.record(M, A, failure=True, n_targets=3) is None
        assert (await second.reload(M)).failing == {A: 1}
    finally:
        await one.aclose()
        await two.aclose()


async def test_the_jitter_is_drawn_within_ten_percent(clock: FakeClock) -> None:
    det = detector(MemoryOutlierStore(), clock)
    durations = []
    for i in range(200):
        event = None
        for _ in range(5):
            event = await det.record(f"m{i}", A, failure=True, n_targets=1)
        assert event is not None
        durations.append(event.until - clock.now)
    assert all(30.0 <= d < 33.0 for d in durations)
    assert max(durations) - min(durations) > 2.5  # it is drawn, not fixed


async def test_an_ejection_is_seen_by_another_process_within_the_refresh(
    redis_url: str, clock: FakeClock
) -> None:
    one, two = PipelinedRedis(redis_url), PipelinedRedis(redis_url)
    seen: list[Ejection] = []
    try:
        first, second = (
            detector(RedisOutlierStore(one), clock),
            detector(RedisOutlierStore(two), clock, seen),
        )
        assert (await second.outliers(M)).ejected == {}
        await first.reload(M)
        event = None
        for _ in range(5):
            event = await first.record(M, A, failure=True, n_targets=3)
        assert event is not None
        assert first.cached(M) is not None and A in first.cached(M).ejected  # type: ignore[union-attr]
        clock.advance(0.5)
        assert (await second.outliers(M)).ejected == {}  # its view is still fresh
        clock.advance(0.5)
        assert (await second.outliers(M)).ejected == {A: event.until}
        clock.now = event.until + 0.1
        assert (await second.reload(M)).ejected == {}
        assert seen == [Ejection(M, A, False, event.until, 1, EXPIRED, event.until)]
    finally:
        await one.aclose()
        await two.aclose()


async def test_the_detector_reports_ejections_and_early_returns(clock: FakeClock) -> None:
    seen: list[Ejection] = []
    det = detector(MemoryOutlierStore(), clock, seen)
    await det.reload(M)
    for _ in range(5):
        await det.record(M, A, failure=True, n_targets=3)
    assert [e.ejected for e in seen] == [True]
    assert A in (await det.outliers(M)).ejected
    back = await det.return_early(M, A)
    assert back is not None and back.reason == ACTIVE_PROBE and seen[-1] is back
    assert (await det.outliers(M)).ejected == {}


async def test_a_dead_store_falls_back_to_memory(clock: FakeClock) -> None:
    dead = PipelinedRedis(f"redis://127.0.0.1:{free_port()}", connect_timeout=0.2)
    try:
        det = detector(FallbackOutlierStore(RedisOutlierStore(dead), MemoryOutlierStore()), clock)
        event = None
        for _ in range(5):
            event = await det.record(M, A, failure=True, n_targets=3)
        assert event is not None
        assert A in (await det.reload(M)).ejected
    finally:
        await dead.aclose()


async def test_a_modules_first_failure_already_has_an_expiry(
    redis_url: str, clock: FakeClock
) -> None:
    """EXPIRE before the first write did nothing: one failure of a target that then gets no
    more traffic left its key in Redis forever (review finding)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    store = RedisOutlierStore(client)
    key = "vx11:od:first-failure"
    try:
        await client.delete(key)
        await store.record(
            "first-failure", A, clock.now, CFG, failure=True, n_targets=3, stretch=1.0
        )
        assert await client.exists(key)
        assert 0 < await client.ttl(key) <= CFG.ttl
    finally:
        await client.delete(key)
        await client.aclose()
