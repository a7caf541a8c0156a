"""Dashboard traffic series (SPEC §14): per-module counters, summed over processes via Redis."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.operations.traffic import BUCKET_SECONDS, KEY_PREFIX, Traffic, percentile
from tests.conftest import OPERATOR_TOKEN, FakeClock, GwEnv, LiveGateway


def test_counts_errors_rejections_and_percentiles_per_bucket(
    clock: FakeClock, gw_env: GwEnv
) -> None:
    gw_env.set(VX11_REDIS_URL="")
    t = Traffic(clock)
    for _ in range(96):
        t.record("alpha", 200, 0.003)  # 3 ms
    for _ in range(3):
        t.record("alpha", 502, 0.900)
    t.record("alpha", 429, 0.001)
    t.record("alpha", 404, 0.001)  # a 4xx is the caller's: no error
    t.record(None, 404, 0.001)  # no module (unknown route): not counted
    clock.advance(BUCKET_SECONDS)
    t.record("beta", 503, 0.02)
    body = asyncio.run(t.series(15))
    alpha = body["modules"]["alpha"]
    assert len(alpha["requests"]) == 15 * 60 // BUCKET_SECONDS
    assert alpha["requests"][-2:] == [101, 0]
    assert alpha["requests_per_second"][-2] == pytest.approx(10.1)
    assert alpha["error_percent"][-2] == pytest.approx(300 / 101, abs=0.01)
    assert alpha["rate_limited"][-2] == 1
    assert 2.0 <= alpha["p50_ms"][-2] <= 4.0  # 3 ms lands in the (2, 4] ms bucket
    assert alpha["p99_ms"][-2] > 100  # the 900 ms answers (3 of 101)
    assert body["modules"]["beta"]["error_percent"][-1] == 100.0
    assert body["modules"]["beta"]["totals"]["requests"] == 1


def test_old_buckets_leave_the_window(clock: FakeClock, gw_env: GwEnv) -> None:
    gw_env.set(VX11_REDIS_URL="")
    t = Traffic(clock)
    t.record("alpha", 200, 0.01)
    clock.advance(16 * 60)
    t.record("alpha", 200, 0.01)
    assert asyncio.run(t.series(15))["modules"]["alpha"]["totals"]["requests"] == 1
    assert len(t.local) == 1  # pruned
    assert t.pending == {}  # without Redis nothing waits for a flush (no unbounded growth)


def test_percentile_of_an_empty_row_is_none() -> None:
    assert percentile(None, 0.5) is None


def test_two_processes_sum_in_redis(clock: FakeClock, gw_env: GwEnv, redis_url: str) -> None:
    """Two accumulators (two processes) flush into one Redis; either reads the sum."""
    import redis

    gw_env.set(VX11_REDIS_URL=redis_url)
    one, two = Traffic(clock), Traffic(clock)

    async def run() -> dict[str, object]:
        for _ in range(7):
            one.record("alpha", 200, 0.002)
        for _ in range(5):
            two.record("alpha", 500, 0.050)
        two.record("alpha", 429, 0.001)
        assert await one.flush() > 0
        assert await two.flush() > 0
        assert await two.flush() == 0  # nothing new: nothing written
        return await one.series(15)

    body = asyncio.run(run())
    totals = body["modules"]["alpha"]["totals"]  # type: ignore[index]
    assert totals["requests"] == 13
    assert totals["errors"] == 5
    assert totals["rate_limited"] == 1
    assert 32 <= totals["p99_ms"] <= 64
    client = redis.Redis.from_url(redis_url)
    keys = client.keys(KEY_PREFIX + "*")
    assert len(keys) == 1 and 0 < client.ttl(keys[0]) <= 16 * 60


def test_the_endpoint_needs_an_admin_and_serves_the_series(gateway: LiveGateway) -> None:
    base = gateway.url
    with httpx.Client(base_url=base, timeout=5) as client:
        for _ in range(3):
            client.post("/vx11/route/task", json={}, headers={"X-VX11-Token": OPERATOR_TOKEN})
        refused = client.get("/vx11/traffic")
        assert refused.status_code == 401
        assert refused.headers["content-type"].startswith("application/problem+json")
        body = client.get("/vx11/traffic?minutes=5", headers={"X-VX11-Token": OPERATOR_TOKEN})
        assert body.status_code == 200
        data = body.json()
        assert len(data["times"]) == 5 * 60 // BUCKET_SECONDS
        assert sum(m["totals"]["requests"] for m in data["modules"].values()) >= 3
        assert client.get("/").headers["location"] == "/docs"


def test_modules_in_trouble_come_first_on_first_paint() -> None:
    from gateway.console.dashboard import cards

    state = {
        "modules": {"alpha": {"status": "up"}, "beta": {"status": "down"}, "gamma": {}},
        "breakers": {"alpha": {"state": "closed"}, "gamma": {"state": "open"}},
    }
    assert [c["name"] for c in cards(state)] == ["gamma", "beta", "alpha"]
