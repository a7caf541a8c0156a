"""Priority limiter: cap, priority order, shedding, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from gateway.policies.backpressure import (
    ANALYSIS,
    HEALTH,
    OTHER,
    PRIORITY_NAMES,
    Overloaded,
    PriorityLimiter,
    QueueTimeout,
    priority_from_name,
)
from tests.conftest import FakeClock


class Arrivals:
    """Queues named callers one at a time, in order, and records who got served when."""

    def __init__(self, limiter: PriorityLimiter) -> None:
        self.limiter = limiter
        self.served: list[str] = []
        self.shed: list[str] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def arrive(self, name: str, priority: int, deadline: float | None = None) -> None:
        async def call() -> None:
            try:
                await self.limiter.acquire(priority, deadline)
            except Overloaded:
                self.shed.append(name)
                raise
            self.served.append(name)
            await asyncio.sleep(0)
            self.limiter.release()

        self.tasks[name] = asyncio.create_task(call())
        for _ in range(3):  # let it queue, and any waiter it displaced wake up
            await asyncio.sleep(0)

    async def finish(self) -> None:
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def held(limiter: PriorityLimiter) -> None:
    await limiter.acquire(OTHER, None)
    assert limiter.inflight == limiter.max_inflight


def test_priorities_by_name() -> None:
    assert [priority_from_name(n) for n in ("health", "analysis", "Other")] == [0, 1, 2]
    assert PRIORITY_NAMES == {HEALTH: "health", ANALYSIS: "analysis", OTHER: "other"}
    with pytest.raises(ValueError):
        priority_from_name("urgent")


async def test_free_slots_are_taken_at_once() -> None:
    limiter = PriorityLimiter(max_inflight=2, queue_max=0)
    await limiter.acquire(OTHER, None)
    await limiter.acquire(OTHER, None)
    assert (limiter.inflight, limiter.queued) == (2, 0)
    with pytest.raises(Overloaded):
        await limiter.acquire(HEALTH, None)
    limiter.release()
    limiter.release()
    assert limiter.inflight == 0
    with pytest.raises(RuntimeError):
        limiter.release()


async def test_waiters_are_served_by_priority_then_fifo() -> None:
    limiter = PriorityLimiter(max_inflight=1, queue_max=10)
    await held(limiter)
    arrivals = Arrivals(limiter)
    for name, priority in [("other1", OTHER), ("analysis1", ANALYSIS), ("other2", OTHER),
                           ("health1", HEALTH), ("analysis2", ANALYSIS), ("health2", HEALTH)]:  # fmt: skip
        await arrivals.arrive(name, priority)
    assert limiter.queued == 6
    limiter.release()
    await arrivals.finish()
    assert arrivals.served == ["health1", "health2", "analysis1", "analysis2", "other1", "other2"]
    assert (limiter.inflight, limiter.queued) == (0, 0)


async def test_a_full_queue_sheds_the_newest_lowest_priority_waiter() -> None:
    limiter = PriorityLimiter(max_inflight=1, queue_max=2)
    await held(limiter)
    arrivals = Arrivals(limiter)
    await arrivals.arrive("other_a", OTHER)
    await arrivals.arrive("other_b", OTHER)
    assert arrivals.shed == []
    await arrivals.arrive("analysis_c", ANALYSIS)  # sheds other_b (newest other)
    assert arrivals.shed == ["other_b"]
    await arrivals.arrive("health_d", HEALTH)  # sheds other_a
    await arrivals.arrive("other_e", OTHER)  # nothing lower queued: other_e itself is shed
    await arrivals.arrive("health_f", HEALTH)  # sheds analysis_c
    await arrivals.arrive("health_g", HEALTH)  # queue is all health: health_g is shed
    assert arrivals.shed == ["other_b", "other_a", "other_e", "analysis_c", "health_g"]
    assert limiter.queued == 2
    error = arrivals.tasks["other_e"].exception()
    assert isinstance(error, Overloaded)
    assert (error.priority, error.retry_after) == (OTHER, 1.0)
    limiter.release()
    await arrivals.finish()
    assert arrivals.served == ["health_d", "health_f"]


async def test_health_is_never_shed_for_lower_priorities() -> None:
    limiter = PriorityLimiter(max_inflight=1, queue_max=3)
    await held(limiter)
    arrivals = Arrivals(limiter)
    await arrivals.arrive("health", HEALTH)
    for i in range(20):
        await arrivals.arrive(f"analysis{i}", ANALYSIS)
        await arrivals.arrive(f"other{i}", OTHER)
    assert len(arrivals.shed) == 38
    assert "health" not in arrivals.shed
    limiter.release()
    await arrivals.finish()
    assert arrivals.served[0] == "health"


async def test_a_waiter_whose_deadline_passes_leaves_with_queue_timeout() -> None:
    limiter = PriorityLimiter(max_inflight=1, queue_max=5)
    await held(limiter)
    started = time.monotonic()
    with pytest.raises(QueueTimeout) as caught:
        await limiter.acquire(ANALYSIS, started + 0.05)
    assert 0.04 <= time.monotonic() - started < 0.2
    assert caught.value.priority == ANALYSIS
    assert limiter.queued == 0
    limiter.release()  # nobody is handed the slot: it is free again
    assert limiter.inflight == 0


async def test_deadlines_are_read_on_the_injected_clock() -> None:
    clock = FakeClock(start=500.0)
    limiter = PriorityLimiter(max_inflight=1, queue_max=5, clock=clock)
    await held(limiter)
    with pytest.raises(QueueTimeout):
        await limiter.acquire(OTHER, deadline=499.0)  # already past: no wait at all
    started = time.monotonic()
    with pytest.raises(QueueTimeout):
        await limiter.acquire(OTHER, deadline=clock.now + 0.05)
    assert time.monotonic() - started < 0.2


async def test_a_waiter_served_before_its_deadline_keeps_the_slot() -> None:
    limiter = PriorityLimiter(max_inflight=1, queue_max=5)
    await held(limiter)
    waiter = asyncio.create_task(limiter.acquire(OTHER, time.monotonic() + 0.1))
    await asyncio.sleep(0)
    limiter.release()
    await waiter
    await asyncio.sleep(0.15)  # the deadline timer must not fire afterwards
    assert (limiter.inflight, limiter.queued) == (1, 0)


async def test_cancelling_a_waiter_leaves_no_trace() -> None:
    limiter = PriorityLimiter(max_inflight=1, queue_max=5)
    await held(limiter)
    waiter = asyncio.create_task(limiter.acquire(OTHER, None))
    await asyncio.sleep(0)
    assert limiter.queued == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.queued == 0
    limiter.release()
    assert limiter.inflight == 0


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    limiter = PriorityLimiter(max_inflight=1, queue_max=5)
    await held(limiter)
    doomed = asyncio.create_task(limiter.acquire(HEALTH, None))
    await asyncio.sleep(0)
    patient = asyncio.create_task(limiter.acquire(OTHER, None))
    await asyncio.sleep(0)
    limiter.release()  # the slot goes to `doomed` ...
    doomed.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.wait_for(patient, 1.0)  # the slot reached the next waiter
    assert (limiter.inflight, limiter.queued) == (1, 0)
    limiter.release()
    assert limiter.inflight == 0


async def test_slot_context_releases_on_error() -> None:
    limiter = PriorityLimiter(max_inflight=1, queue_max=5)
    with pytest.raises(KeyError):
        async with limiter.slot(OTHER, None):
            assert limiter.inflight == 1
            raise KeyError("upstream blew up")
    assert limiter.inflight == 0


async def test_inflight_never_exceeds_the_cap_under_load() -> None:
    limiter = PriorityLimiter(max_inflight=5, queue_max=1000)
    rng = random.Random(3)
    active = peak = 0
    done = 0

    async def worker(i: int) -> None:
        nonlocal active, peak, done
        async with limiter.slot(i % 3, None):
            active += 1
            peak = max(peak, active)
            assert limiter.inflight <= 5
            try:
                for _ in range(rng.randint(1, 3)):
                    await asyncio.sleep(0)
            finally:
                active -= 1
            done += 1

    tasks = [asyncio.create_task(worker(i)) for i in range(200)]
    await asyncio.sleep(0)
    for task in rng.sample(tasks, 20):  # some clients go away mid-wait or mid-call
        task.cancel()
    results: list[Any] = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)
    assert peak == 5
    assert not [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)]
    assert done >= 180
    assert (limiter.inflight, limiter.queued) == (0, 0)
