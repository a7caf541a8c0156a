"""Bulkheads: per-module limiters made lazily, resized live; ``PriorityLimiter.resize``."""

from __future__ import annotations

import asyncio

import pytest

from gateway.policies.backpressure import HEALTH, OTHER, Overloaded, PriorityLimiter, QueueTimeout
from gateway.policies.bulkheads import Bulkheads
from tests.conftest import FakeClock


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_each_module_gets_its_own_limiter_on_first_use(clock: FakeClock) -> None:
    heads = Bulkheads(queue_max=5, clock=clock)
    assert heads.peek("spawner") is None and heads.usage() == {}
    spawner = heads.get("spawner", 2)
    assert heads.get("spawner", 2) is spawner and heads.get("shub", 16) is not spawner
    assert (spawner.max_inflight, spawner.queue_max, spawner.clock) == (2, 5, clock)
    await spawner.acquire(OTHER)
    assert heads.usage() == {"spawner": (1, 0), "shub": (0, 0)}


async def test_one_module_at_its_cap_does_not_block_another() -> None:
    heads = Bulkheads(queue_max=5)
    spawner, shub = heads.get("spawner", 1), heads.get("shub", 1)
    await spawner.acquire(OTHER)
    waiting = asyncio.create_task(spawner.acquire(OTHER))
    await settle()
    await asyncio.wait_for(shub.acquire(OTHER), 0.5)  # at once
    assert not waiting.done() and heads.usage() == {"spawner": (1, 1), "shub": (1, 0)}
    spawner.release()
    await waiting


async def test_raising_the_cap_serves_waiters_at_once_best_first() -> None:
    limiter = Bulkheads(queue_max=5).get("spawner", 1)
    await limiter.acquire(OTHER)
    served: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await limiter.acquire(priority)
        served.append(name)

    tasks = [asyncio.create_task(wait(n, p)) for n, p in [("o1", OTHER), ("o2", OTHER)]]
    await settle()
    tasks.append(asyncio.create_task(wait("h", HEALTH)))
    await settle()
    assert served == [] and limiter.queued == 3
    limiter.resize(3)  # two more slots: the best two waiters, nobody released
    await settle()
    assert served == ["h", "o1"] and (limiter.inflight, limiter.queued) == (3, 1)
    limiter.release()
    await asyncio.gather(*tasks)
    assert served == ["h", "o1", "o2"]


async def test_lowering_the_cap_drains_the_holders_above_it() -> None:
    heads = Bulkheads(queue_max=5)
    limiter = heads.get("spawner", 3)
    for _ in range(3):
        await limiter.acquire(OTHER)
    waiter = asyncio.create_task(limiter.acquire(OTHER))
    assert heads.get("spawner", 1) is limiter and limiter.max_inflight == 1  # resized
    await settle()
    limiter.release()  # 3 → 2: above the cap, the slot is freed, not handed on
    limiter.release()  # 2 → 1
    await settle()
    assert not waiter.done() and (limiter.inflight, limiter.queued) == (1, 1)
    limiter.release()  # at the cap: handed to the waiter
    await waiter
    assert (limiter.inflight, limiter.queued) == (1, 0)
    limiter.release()
    assert limiter.inflight == 0


async def test_the_module_queue_is_bounded_and_has_deadlines(clock: FakeClock) -> None:
    limiter = Bulkheads(queue_max=1, clock=clock, retry_after=2.0).get("spawner", 1)
    await limiter.acquire(OTHER)
    queued = asyncio.create_task(limiter.acquire(OTHER, deadline=clock() + 0.05))
    await settle()
    with pytest.raises(Overloaded) as shed:
        await limiter.acquire(OTHER)
    assert shed.value.retry_after == 2.0
    with pytest.raises(QueueTimeout):
        await queued  # the loop timer fires after 0.05 s of real time


def test_a_cap_below_one_or_a_negative_queue_is_refused() -> None:
    with pytest.raises(ValueError):
        Bulkheads(queue_max=-1)
    with pytest.raises(ValueError):
        PriorityLimiter(2, 1).resize(0)


async def test_a_waiter_cancelled_in_the_queue_takes_nothing_and_the_queue_moves_on() -> None:
    limiter = Bulkheads(queue_max=5).get("spawner", 1)
    await limiter.acquire(OTHER)  # the holder
    leaver = asyncio.create_task(limiter.acquire(OTHER))
    await settle()
    stayer = asyncio.create_task(limiter.acquire(OTHER))
    await settle()
    assert (limiter.inflight, limiter.queued) == (1, 2)
    leaver.cancel()  # its request went away while it waited
    await settle()
    assert leaver.cancelled()
    assert (limiter.inflight, limiter.queued) == (1, 1)  # nothing released, one less queued
    limiter.release()  # the holder is done: the slot goes to the next one waiting
    await asyncio.wait_for(stayer, 0.5)
    assert (limiter.inflight, limiter.queued) == (1, 0)
    limiter.release()
    assert (limiter.inflight, limiter.queued) == (0, 0)


async def test_a_waiter_cancelled_as_it_is_woken_passes_the_slot_on() -> None:
    """The slot was handed to a waiter whose task is cancelled before it runs: the slot
    is not lost, the next waiter gets it."""
    limiter = Bulkheads(queue_max=5).get("spawner", 1)
    await limiter.acquire(OTHER)
    woken = asyncio.create_task(limiter.acquire(OTHER))
    await settle()
    nxt = asyncio.create_task(limiter.acquire(OTHER))
    await settle()
    limiter.release()  # hands the slot to ``woken`` …
    woken.cancel()  # … which is cancelled before it resumes
    await settle()
    await asyncio.wait_for(nxt, 0.5)
    assert woken.cancelled() and (limiter.inflight, limiter.queued) == (1, 0)
    limiter.release()
    assert limiter.inflight == 0
