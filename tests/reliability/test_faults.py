"""Faults under load: Redis and PostgreSQL outages, a misbehaving upstream, clients leaving.

Each test runs a real gateway process against real servers and drives bounded
load from an ``httpx.AsyncClient``. Figures are printed for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
import redis
from aiohttp import web

from tests.reliability.conftest import (
    GW,
    OP,
    Gateways,
    assert_no_traceback,
    await_for,
    figure,
    load,
    manage,
    metric,
    open_fds,
    percentile,
    pid_of,
    stop_postgres,
    summary,
)
from tests.servers import PostgresServer, RedisServer, UpstreamServer, fresh_database_url

pytestmark = pytest.mark.reliability


# --------------------------------------------------------------------------- Redis


async def test_redis_outage_under_load_never_stalls_requests_and_recovers_without_restart(
    gateways: Gateways, echo: UpstreamServer, own_redis: RedisServer
):
    """Redis hangs (SIGSTOP), then dies, then comes back while traffic flows.

    Every request is answered 200; the store's timeout bounds what the outage adds to a
    request; limits fall back to the process (fail mode ``local``); once Redis is back the
    shared counters are used again, without restarting the gateway.
    """
    env = gateways.env(echo.url, VX11_REDIS_URL=own_redis.url, VX11_RATE_LIMIT_FAIL_MODE="local")
    limited = manage(env, "create_api_client", "limited", "--rate-limit", "5").split()[-1]
    server = gateways.start(env)
    as_limited = {"X-VX11-Token": limited}

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

        async def task(_: int) -> httpx.Response:
            return await client.post("/vx11/route/task", json={"q": 1}, headers=OP)

        async def degraded() -> bool:
            answer = await client.get("/vx11/rate-limit/status", headers=OP)
            return bool(answer.json()["degraded"])

        await load(task, concurrency=8, count=200)  # warm: pools, snapshot, breaker keys
        healthy = await load(task, concurrency=8, duration=2.0)

        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # hung: connections open, no answers
        hung = await load(task, concurrency=8, duration=3.0)
        hung_limited = [
            (await client.post("/vx11/route/task", json={}, headers=as_limited)).status_code
            for _ in range(8)
        ]
        hung_degraded = await degraded()

        await asyncio.to_thread(own_redis.kill)  # dead: connections refused
        dead = await load(task, concurrency=8, duration=2.0)

        await asyncio.to_thread(own_redis.start)  # same port, empty: nothing persisted
        back_at = time.monotonic()
        recovered = await await_for(lambda: _not(degraded), timeout=10)
        recovery = time.monotonic() - back_at
        after = await load(task, concurrency=8, duration=2.0)
        after_limited = [
            (await client.post("/vx11/route/task", json={}, headers=as_limited)).status_code
            for _ in range(7)
        ]

    with redis.Redis.from_url(own_redis.url) as check:
        keys = check.keys("vx11:rl:*")
    for name, samples in (("healthy", healthy), ("hung", hung), ("dead", dead), ("after", after)):
        figure(f"redis outage / {name}", summary(samples))
    figure("redis outage / recovery", f"degraded=false {recovery:.2f}s after Redis restarted")

    every = healthy + hung + dead + after
    assert {s.status for s in every} == {200}, [s for s in every if s.status != 200][:5]
    # The outage adds a store timeout (50 ms) to one request now and then, never a stall:
    # without it a request would wait for the Redis client's socket timeout (seconds).
    # The bound on the worst request allows for what the machine itself does to the healthy
    # phase (under a parallel test run its own maximum reached 436 ms here). The p99 may
    # carry a few store timeouts under a loaded machine (170 ms against a healthy 57 ms once
    # in CI, with -n auto on two cores): 250 ms over the healthy p99 is still far below any
    # socket timeout.
    healthy_p99 = percentile([s.latency for s in healthy], 99)
    healthy_max = max(s.latency for s in healthy)
    for samples in (hung, dead):
        latencies = [s.latency for s in samples]
        assert max(latencies) < max(0.5, healthy_max + 0.3)
        assert percentile(latencies, 99) < healthy_p99 + 0.25
    # Fail mode local: this process kept counting on its own (5 admitted, then 429).
    assert hung_degraded is True
    assert hung_limited == [200] * 5 + [429] * 3
    # Back to Redis without a restart: its (empty) shared log counts again.
    assert recovered, "still degraded 10 s after Redis came back"
    assert after_limited == [200] * 5 + [429] * 2
    assert keys, "no rate-limit key in Redis after recovery"


async def _not(predicate) -> bool:
    return not await predicate()


# --------------------------------------------------------------------------- PostgreSQL


def _is_problem(answer: httpx.Response) -> bool:
    if not answer.headers.get("content-type", "").startswith("application/problem+json"):
        return False
    body = answer.json()
    return body.get("status") == answer.status_code and bool(body.get("correlation_id"))


async def test_postgres_restart_leaves_the_proxy_serving_and_the_api_answering_problems(
    gateways: Gateways, echo: UpstreamServer, redis_url: str
):
    """PostgreSQL stops for a while under proxy load, then comes back.

    The proxy answers every request from its snapshot throughout; the management API
    answers clean problem+json 5xx while the database is down (no traceback in the body),
    and works again afterwards without restarting the gateway.
    """
    pg = PostgresServer().start()
    try:
        env = gateways.env(
            echo.url,
            DATABASE_URL=fresh_database_url(pg.url, gateways.workdir),
            VX11_REDIS_URL=redis_url,
        )
        server = gateways.start(env)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

            async def task(_: int) -> httpx.Response:
                return await client.post("/vx11/route/task", json={"q": 1}, headers=OP)

            assert (await client.get("/vx11/routes", headers=OP)).status_code == 200
            await load(task, concurrency=4, count=50)
            proxy = asyncio.create_task(load(task, concurrency=4, duration=6.0))
            await asyncio.sleep(0.5)

            await asyncio.to_thread(stop_postgres, pg)
            down: list[tuple[str, httpx.Response, float]] = []
            for path in (
                "/vx11/routes",
                "/vx11/modules",
                "/vx11/routes/chat",
                "/vx11/context-7/sessions",
                "/ready",
            ):
                for _ in range(3):
                    started = time.monotonic()
                    answer = await client.get(path, headers=OP)
                    down.append((path, answer, time.monotonic() - started))

            await asyncio.to_thread(pg.start)
            back_at = time.monotonic()
            after = []
            for path in ("/vx11/routes", "/vx11/modules", "/vx11/context-7/sessions", "/ready"):
                for _ in range(3):
                    after.append((path, await client.get(path, headers=OP)))
            first_ok = time.monotonic() - back_at
            served = await proxy
    finally:
        if pg.proc is not None:
            stop_postgres(pg)
        pg.close()

    figure("postgres restart / proxy", summary(served))
    figure(
        "postgres restart / API while down",
        ", ".join(sorted({f"{p} {a.status_code}" for p, a, _ in down}))
        + f"; slowest {max(s for *_, s in down) * 1000:.0f} ms",
    )
    figure(
        "postgres restart / API after",
        ", ".join(sorted({f"{p} {a.status_code}" for p, a in after}))
        + f" ({first_ok:.2f}s for all)",
    )

    assert {s.status for s in served} == {200}
    for path, answer, seconds in down:
        assert answer.status_code >= 500, (path, answer.status_code, answer.text)
        assert seconds < 5
        if path == "/ready":
            assert answer.json()["checks"]["database"] != "ok"
            continue
        assert _is_problem(answer), (path, answer.status_code, answer.text)
        assert "Traceback" not in answer.text and "psycopg" not in answer.text
    assert [(p, a.status_code) for p, a in after] == [(p, 200) for p, _ in after]
    assert not [a for _, a, _ in down if 'File "' in a.text]


# --------------------------------------------------------------------------- upstream faults


def _flapping() -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    calls = [0]

    async def handler(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        if calls[0] % 2:
            return web.json_response({"error": "flap"}, status=503)
        return web.json_response({"ok": True})

    return handler


async def _slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(1.0)
    return web.json_response({"ok": True})


async def _reset(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.abort()  # RST: the gateway sees the connection torn down
    return web.Response()


@pytest.mark.parametrize("fault", ["flapping", "flapping-no-breaker", "slow", "resetting"])
async def test_breaker_and_retry_budget_bound_upstream_amplification(
    gateways: Gateways, echo: UpstreamServer, fault: str
):
    """GET /shub/... (idempotent, so retried) against a misbehaving module for 3 s.

    Upstream calls per client request stay at most 1.25 over the run, whatever the fault.
    """
    path = f"/{fault}/item"
    if fault.startswith("flapping"):
        echo.route("GET", path, _flapping())
    else:
        echo.route("GET", path, _slow if fault == "slow" else _reset)
    env = gateways.env(
        echo.url,
        VX11_SHUB_TIMEOUT="0.3",
        VX11_CB_RECOVERY_TIMEOUT="0.5",
        VX11_CB_ENABLED=str(fault != "flapping-no-breaker").lower(),
    )
    server = gateways.start(env)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        samples = await load(
            lambda _: client.get("/shub" + path, headers=GW), concurrency=8, duration=3.0
        )
        exposition = (await client.get("/metrics")).text
    upstream_calls = sum(1 for seen in echo.seen if seen.path == path)
    amplification = upstream_calls / len(samples)
    figure(
        f"upstream {fault}",
        f"{summary(samples)} upstream_calls={upstream_calls} "
        f"amplification={amplification:.3f} retries={metric(exposition, 'vx11_retries_total')}",
    )
    assert all(s.status for s in samples), "a client request failed at the transport level"
    assert {s.status for s in samples} <= {200, 502, 503, 504}
    # 20 % of recent requests, but never fewer than 3 retries in flight (SPEC §7, Envoy's
    # min_retry_concurrency): with only 8 clients that floor is worth up to a few per cent
    # more on a slow machine (1.200 with 741 requests, 1.205 with 317).
    assert amplification <= 1.25
    assert_no_traceback(server)


# --------------------------------------------------------------------------- client disconnects


async def test_client_leaving_mid_stream_cancels_the_upstream_and_leaks_nothing(
    gateways: Gateways, echo: UpstreamServer
):
    """Clients read the first chunk of a 10-second streamed answer, then hang up.

    The module's connection is closed within a second (its handler's write fails), the
    gateway's open file descriptors return to their baseline and no call stays in flight.
    """
    closed: list[tuple[str, float]] = []
    completed: list[int] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        try:
            for i in range(200):  # 10 s unless the reader leaves
                await response.write(b"chunk %d\n" % i)
                await asyncio.sleep(0.05)
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            closed.append((type(exc).__name__, time.monotonic()))
            return response
        completed.append(1)
        return response

    echo.route("POST", "/switch/task", stream)
    server = gateways.start(gateways.env(echo.url))
    pid = pid_of(server)

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        # Warm up: imports, the upstream pool (same host and port as the stream), metrics.
        assert (await client.get("/shub/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
    baseline = open_fds(pid)

    leaving = 10
    hung_up: list[float] = []

    async def leave() -> None:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=10) as client,
            client.stream(
                "POST", "/vx11/route/stream", json={"stream": True}, headers=OP
            ) as answer,
        ):
            assert answer.status_code == 200
            async for _ in answer.aiter_raw():
                break
        hung_up.append(time.monotonic())

    await asyncio.gather(*(leave() for _ in range(leaving)))
    all_closed = await await_for(lambda: _true(len(closed) >= leaving), timeout=3.0)
    fds_back = await await_for(lambda: _true(open_fds(pid) <= baseline), timeout=5.0)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        exposition = (await client.get("/metrics")).text
    detect = [at - max(hung_up) for _, at in closed]
    figure(
        "stream disconnect",
        f"{len(closed)}/{leaving} upstream handlers saw the close "
        f"({sorted({name for name, _ in closed})}), slowest {max(detect, default=-1) * 1000:.0f} ms "
        f"after the last client left; fds baseline={baseline} now={open_fds(pid)}; "
        f"inflight={metric(exposition, 'vx11_inflight_requests')}",
    )
    assert all_closed, f"only {len(closed)} of {leaving} upstream streams were cancelled"
    assert not completed
    assert fds_back, f"open fds {open_fds(pid)} > baseline {baseline}"
    assert metric(exposition, "vx11_inflight_requests") == 0
    assert_no_traceback(server)


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- regressions
# Focused checks of the product fixes the load tests above led to (docs/RELIABILITY.md).


@pytest.fixture
def hung_redis(own_redis: RedisServer):
    """A Redis that accepts connections and never answers (SIGSTOP), resumed afterwards."""
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    yield own_redis
    os.kill(own_redis.proc.pid, signal.SIGCONT)


async def test_a_hung_store_is_probed_by_one_request_at_a_time_not_by_all(hung_redis, clock):
    """Once the back-off ends, one caller probes the store; the others use the fallback.

    Before the fix every request arriving during the probe also waited the store timeout.
    """
    import redis.asyncio as aioredis

    from gateway.policies.ratelimit import StoreGuard, StoreUnavailable

    client = aioredis.Redis.from_url(hung_redis.url, socket_connect_timeout=1)
    guard = StoreGuard(timeout=0.05, retry_interval=1.0, monotonic=clock)
    with pytest.raises(StoreUnavailable):
        await guard.call(lambda: client.get("k"))
    clock.advance(1.0)
    outcomes = await asyncio.gather(
        *(guard.call(lambda: client.get("k")) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(o, StoreUnavailable) for o in outcomes)
    backed_off = [o for o in outcomes if str(o) == "store in retry back-off"]
    assert len(backed_off) == 9
    await client.aclose(close_connection_pool=True)


async def test_a_hung_breaker_store_is_probed_by_one_call_at_a_time(hung_redis, clock):
    import redis.asyncio as aioredis

    from gateway.policies.breaker import (
        BreakerConfig,
        FallbackBreakerBackend,
        MemoryBreakerBackend,
        RedisBreakerBackend,
    )

    class Counting(RedisBreakerBackend):
        calls = 0

        async def acquire(self, *args, **kwargs):
            Counting.calls += 1
            return await super().acquire(*args, **kwargs)

    client = aioredis.Redis.from_url(hung_redis.url, socket_connect_timeout=1)
    backend = FallbackBreakerBackend(
        Counting(client), MemoryBreakerBackend(), timeout=0.05, retry_interval=1.0, clock=clock
    )
    cfg = BreakerConfig()
    await backend.acquire("switch", cfg, 1.0)
    assert backend.degraded and Counting.calls == 1
    clock.advance(1.0)
    permits = await asyncio.gather(*(backend.acquire("switch", cfg, 2.0) for _ in range(10)))
    assert all(permit.allowed for permit, _ in permits)
    assert Counting.calls == 2  # one probe for the ten calls
    await client.aclose(close_connection_pool=True)


async def test_the_route_table_version_check_waits_one_store_timeout_at_most(
    hung_redis, gw_env, clock
):
    """The version check ran with four store timeouts (200 ms) on a request's path."""
    from gateway.config.snapshot import Snapshot, SnapshotHolder

    gw_env.set(VX11_REDIS_URL=hung_redis.url, VX11_STORE_TIMEOUT="0.05")
    holder = SnapshotHolder(clock=clock)
    holder._snapshot = Snapshot(7, {}, {})  # as if loaded before the outage
    clock.advance(10)  # past VX11_ROUTE_REFRESH_SECONDS: this call checks the version
    started = time.monotonic()
    snapshot = await holder.current()
    waited = time.monotonic() - started
    figure("regression / version check on a hung store", f"{waited * 1000:.0f} ms")
    assert snapshot.version == 7  # the previous table keeps serving
    assert waited < 0.15


def test_the_retry_budget_never_rounds_a_fraction_of_a_retry_up(clock):
    """20 % of 99 requests is 19.8: 19 retries, not 20 (the flapping load measured 1.2004)."""
    from gateway.policies.retry import RetryBudget

    # No floor: it grants any retry while fewer than three are in flight (SPEC §7).
    budget = RetryBudget(ratio=0.2, min_retries=0, window=10.0, clock=clock)
    for _ in range(99):
        budget.note_request("shub")
    granted = 0
    for _ in range(50):
        if budget.try_acquire_retry("shub"):
            granted += 1
            budget.release_retry("shub")
    assert granted == 19
