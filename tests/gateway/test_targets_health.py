"""Active health per target (SPEC §11, §18): every enabled target on its own schedule, the
module up / degraded / down, the down flag shared with the request path, early returns of
ejected targets, ``target.health`` / ``target.ejected`` on the live stream, the gauges, and
``run_demo_modules --replicas``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from channels.testing import WebsocketCommunicator
from prometheus_client import REGISTRY

from gateway.config.modules import ModuleInfo, TargetInfo, env_targets
from gateway.console.dashboard import cards
from gateway.demo import replica_env, replica_ports, serve_replicas
from gateway.models import ModuleHealth
from gateway.operations import events, targets
from gateway.operations import registry as services
from gateway.operations.health import HealthChecker, ModuleState, probe_transport
from gateway.operations.health_schedule import pool_state
from gateway.policies.outlier import OutlierDetector
from gateway.state.ejections import OutlierConfig
from gateway.state.memory import MemoryOutlierStore
from gateway.state.redis_outliers import RedisOutlierStore
from tests.conftest import OPERATOR_TOKEN
from tests.gateway.policies.test_outlier import store as outlier_store
from tests.servers import UpstreamServer, free_port

MIDDLE = 0.5  # rng value that gives no jitter
STEP = 0.25


@pytest.fixture
def replicas() -> Iterator[tuple[UpstreamServer, UpstreamServer]]:
    """Two replicas of one module: ``a`` healthy, ``b`` answers its probes as told."""
    a, b = UpstreamServer().start(), UpstreamServer().start()
    yield a, b
    a.stop()
    b.stop()


def pool(name: str, *servers: UpstreamServer) -> ModuleInfo:
    return ModuleInfo(name, "", targets=tuple(TargetInfo(s.url) for s in servers))


def table_of(*infos: ModuleInfo) -> Any:
    async def modules() -> dict[str, ModuleInfo]:
        return {info.name: info for info in infos}

    return modules


def key(server: UpstreamServer) -> str:
    return f"127.0.0.1:{server.port}"


def probes(server: UpstreamServer) -> int:
    return sum(1 for seen in server.seen if seen.path == "/health")


async def _noop(module: str) -> None:
    return None


async def next_of(layer: Any, channel: str, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next event of type ``kind`` on ``channel`` (others are skipped)."""
    while True:
        message = await asyncio.wait_for(layer.receive(channel), timeout)
        if message["event"]["type"] == kind:
            return dict(message["event"])


# --------------------------------------------------------------------------- schedule


def test_the_module_is_up_degraded_or_down_from_its_targets():
    up, down = ModuleState("up", 0, 3), ModuleState("down", 4, 0, True)
    assert pool_state([up]) == up and pool_state([down]) == down
    assert pool_state([up, down]).status == "degraded"
    assert pool_state([down, ModuleState("down", 2, 0, True)]) == ModuleState("down", 2, 0, True)
    assert pool_state([up, ModuleState()]).status == "up"  # not probed yet: left out
    assert pool_state([ModuleState(), ModuleState()]).status == "unknown"


async def test_each_target_is_probed_on_its_own_schedule_with_backoff(replicas, clock):
    a, b = replicas
    b.respond("GET", "/health", status=503)
    detector = OutlierDetector(MemoryOutlierStore(), clock=clock)
    async with probe_transport() as client:
        checker = HealthChecker(
            client,
            modules=table_of(pool("switch", a, b)),
            persist=False,
            clock=clock,
            wall=clock,
            rng=lambda: MIDDLE,
            mark_healthy=_noop,
            outliers=lambda: detector,
        )
        seen: dict[str, list[float]] = {"a": [], "b": []}
        counts = {"a": 0, "b": 0}
        start = clock.now
        while clock.now - start < 10.05:
            await checker.step()
            await checker.drain()
            for name, server in (("a", a), ("b", b)):
                if probes(server) > counts[name]:
                    counts[name] = probes(server)
                    seen[name].append(clock.now - start)
            clock.advance(STEP)
    assert seen["a"] == [0.0, 5.0, 10.0]  # healthy: every 5 s
    assert seen["b"] == [0.0, 1.0, 2.0, 4.0, 8.0]  # failing: 1 s, then backoff 2, 4 s
    assert checker.targets[("switch", key(b))].consecutive_failures == 5
    assert checker.targets[("switch", key(a))].status == "up"
    assert checker.states["switch"].status == "degraded"
    assert (await detector.store.outliers("switch", clock.now, OutlierConfig())).down == {key(b)}


# --------------------------------------------------------------------------- store contract


store = outlier_store  # the outlier suite's fixture: memory, Redis, Redis pipelined


async def test_the_down_flag_contract_on_every_store(store, clock):
    """``mark_down`` on memory and Redis alike: in the view beside ejections, changed only
    once, independent of the ejection arithmetic (a down target may be ejected too)."""
    cfg = OutlierConfig(jitter=0.0)
    assert await store.mark_down("switch", "h:1", True, cfg) is True
    assert await store.mark_down("switch", "h:1", True, cfg) is False  # renewed, not changed
    for _ in range(5):
        await store.record("switch", "h:1", clock.now, cfg, failure=True, n_targets=2, stretch=1.0)
    seen = await store.outliers("switch", clock.now, cfg)
    assert seen.down == {"h:1"} and "h:1" in seen.ejected
    await store.record("switch", "h:2", clock.now, cfg, failure=False, n_targets=2, stretch=1.0)
    assert (await store.outliers("other", clock.now, cfg)).down == set()
    assert await store.mark_down("switch", "h:1", False, cfg) is True
    assert await store.mark_down("switch", "h:1", False, cfg) is False
    seen = await store.outliers("switch", clock.now, cfg)
    assert seen.down == set() and "h:1" in seen.ejected


# --------------------------------------------------------------------------- module health


@pytest.mark.django_db(transaction=True)
async def test_module_health_is_degraded_then_down_then_up_with_gauges(replicas, gw_env, clock):
    a, b = replicas
    info = pool("hermes", a, b)
    b.respond("GET", "/health", status=503)
    detector = OutlierDetector(services.memory_outlier_store(), clock=clock)
    async with probe_transport() as client:
        checker = HealthChecker(
            client,
            modules=table_of(info),
            clock=clock,
            wall=clock,
            mark_healthy=_noop,
            outliers=lambda: detector,
        )
        result = await checker.check(info)
        row = await ModuleHealth.objects.aget(module="hermes")
        assert row.status == "degraded" and result.ok
        assert row.last_error == f"1 of 2 targets down: {key(b)}: HTTP 503"
        assert REGISTRY.get_sample_value("vx11_module_up", {"module": "hermes"}) == 1.0
        up = {"module": "hermes", "target": key(a)}
        assert REGISTRY.get_sample_value("vx11_target_up", up) == 1.0
        assert REGISTRY.get_sample_value("vx11_target_up", {**up, "target": key(b)}) == 0.0

        targets._runtime.clear()
        listed = {t["key"]: t for t in await asyncio.to_thread(targets.target_list, info)}
        assert listed[key(b)]["health"]["status"] == "down" and listed[key(b)]["down"] is True
        assert listed[key(b)]["health"]["last_error"] == "HTTP 503"
        assert listed[key(a)]["health"]["status"] == "up" and listed[key(a)]["down"] is False

        a.respond("GET", "/health", status=500)
        clock.advance(1)
        assert not (await checker.check(info)).ok
        row = await ModuleHealth.objects.aget(module="hermes")
        assert (row.status, row.consecutive_failures) == ("down", 1)
        assert REGISTRY.get_sample_value("vx11_module_up", {"module": "hermes"}) == 0.0

        a.respond("GET", "/health", status=200)
        b.respond("GET", "/health", status=200)
        clock.advance(1)
        await checker.check(info)
        row = await ModuleHealth.objects.aget(module="hermes")
        assert (row.status, row.last_error) == ("up", "")
        assert (
            services.memory_outlier_store().view("hermes", clock.now, OutlierConfig()).down == set()
        )
    await events.flush()


# --------------------------------------------------------------------------- shared state


@pytest.mark.django_db(transaction=True)
async def test_a_failing_probe_marks_the_target_down_in_redis_until_a_probe_passes(
    replicas, gw_env, redis_url
):
    gw_env.set(VX11_REDIS_URL=redis_url)
    a, b = replicas
    info = pool("switch", a, b)
    b.respond("GET", "/health", status=503)
    client = aioredis.Redis.from_url(redis_url)
    other_host = RedisOutlierStore(client)  # what any other gateway process reads
    try:
        async with probe_transport() as transport:
            checker = HealthChecker(
                transport, modules=table_of(info), persist=False, mark_healthy=_noop
            )
            await checker.check(info)
            seen = await other_host.outliers("switch", 0.0, OutlierConfig())
            assert seen.down == {key(b)}
            assert await client.ttl("vx11:od:switch") > 0  # never kept forever
            b.respond("GET", "/health", status=200)
            await checker.check(info)
            assert (await other_host.outliers("switch", 0.0, OutlierConfig())).down == set()
    finally:
        await client.aclose()
        await services.get().outliers.aclose()


@pytest.mark.django_db(transaction=True)
async def test_a_passing_probe_returns_an_ejected_target_early_and_says_so(replicas, gw_env):
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(events.GROUP, channel)
    a, b = replicas
    info = pool("switch", a, b)
    detector = services.get().outliers
    for _ in range(OutlierConfig().consecutive_failures):
        ejection = await detector.record("switch", key(b), failure=True, n_targets=2)
    assert ejection is not None and ejection.ejected
    began = await next_of(layer, channel, "target.ejected")
    assert (began["target"], began["ejected"]) == (key(b), True)
    async with probe_transport() as client:
        checker = HealthChecker(client, modules=table_of(info), persist=False, mark_healthy=_noop)
        await checker.check(info)
    assert key(b) not in (await detector.reload("switch")).ejected
    ended = await next_of(layer, channel, "target.ejected")
    assert (ended["target"], ended["ejected"], ended["reason"]) == (key(b), False, "active_probe")
    await layer.group_discard(events.GROUP, channel)


@pytest.mark.django_db(transaction=True)
async def test_the_worker_publishes_the_end_of_an_ejection_by_expiry(replicas, gw_env, clock):
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(events.GROUP, channel)
    a, b = replicas
    info = pool("switch", a, b)
    detector = OutlierDetector(MemoryOutlierStore(), clock=clock)
    for _ in range(5):
        await detector.record("switch", key(b), failure=True, n_targets=2)
    async with probe_transport() as client:
        checker = HealthChecker(
            client, persist=False, wall=clock, mark_healthy=_noop, outliers=lambda: detector
        )
        await checker.watch_ejections({"switch": info})
        assert key(b) in checker.ejected["switch"]
        clock.advance(40)  # past 30 s × (1 + jitter ≤ 10 %)
        await checker.watch_ejections({"switch": info})
    ended = await next_of(layer, channel, "target.ejected")
    assert (ended["target"], ended["ejected"], ended["reason"]) == (key(b), False, "expired")
    assert checker.ejected["switch"] == {}
    await layer.group_discard(events.GROUP, channel)


# --------------------------------------------------------------------------- live stream


@pytest.mark.django_db(transaction=True)
async def test_the_snapshot_lists_targets_and_target_health_changes_are_streamed(replicas, gw_env):
    from vx11site.asgi import application

    a, b = replicas
    gw_env.set(VX11_MODULE_SWITCH_URL=f"{a.url},{b.url}")
    services.reset()
    ws = WebsocketCommunicator(
        application, "/ws/events", headers=[(b"x-vx11-token", OPERATOR_TOKEN.encode())]
    )
    connected, _ = await ws.connect(timeout=5)
    assert connected
    snapshot = await ws.receive_json_from(timeout=5)
    listed = snapshot["modules"]["switch"]["targets"]
    assert [t["key"] for t in listed] == [key(a), key(b)]
    assert listed[0]["health"]["status"] == "unknown" and listed[0]["ejected_until"] is None
    b.respond("GET", "/health", status=503)
    info = pool("switch", a, b)
    async with probe_transport() as client:
        checker = HealthChecker(client, modules=table_of(info), persist=False, mark_healthy=_noop)
        await checker.check(info)
    got: dict[str, dict[str, Any]] = {}
    while len(got) < 2:
        event = await ws.receive_json_from(timeout=5)
        if event["type"] == "target.health":
            got[event["target"]] = event
    assert got[key(b)]["status"] == "down" and got[key(b)]["last_error"] == "HTTP 503"
    assert got[key(a)]["status"] == "up"
    await ws.disconnect()
    await services.get().outliers.aclose()


# --------------------------------------------------------------------------- dashboard


def test_the_dashboard_card_lists_each_target_with_its_state():
    now = 1_700_000_000.0
    module = {
        "status": "degraded",
        "targets": [
            {"key": "h:1", "weight": 100, "enabled": True, "health": {"status": "up"}},
            {"key": "h:2", "weight": 50, "enabled": True, "health": {"status": "down"}},
            {"key": "h:3", "weight": 100, "enabled": True, "ejected_until": now + 30},
            {"key": "h:4", "weight": 100, "enabled": False},
        ],
    }
    (card,) = cards({"modules": {"switch": module}, "breakers": {}, "time": now})
    assert card["health_tone"] == "warn"
    states = [(t["key"], t["state"], t["tone"]) for t in card["targets"]]
    assert states == [
        ("h:1", "up", "ok"),
        ("h:2", "down", "bad"),
        ("h:3", "ejected until 22:13:50 UTC", "warn"),
        ("h:4", "disabled", "idle"),
    ]


# --------------------------------------------------------------------------- demo


async def test_demo_replicas_run_on_consecutive_ports_and_are_the_module_targets(monkeypatch):
    ports = replica_ports(["madre", "switch"], 3)
    assert ports == {"madre": [8100, 8101, 8102], "switch": [8110, 8111, 8112]}
    base = free_port()
    found = replica_ports(["switch"], 2, base=base)
    env = replica_env(found)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    urls = env_targets()[0]["switch"]
    assert urls == tuple(f"http://127.0.0.1:{p}" for p in found["switch"])
    runners = await serve_replicas(found)
    try:
        async with httpx.AsyncClient() as http:
            answers = [(await http.get(f"{url}/health")).json() for url in urls]
            await http.post(f"{urls[1]}/_demo/mode", json={"status": 503})
            failing = await http.get(f"{urls[1]}/health")
            healthy = await http.get(f"{urls[0]}/health")
    finally:
        for runner in runners.values():
            await runner.cleanup()
    assert [x["replica"] for x in answers] == found["switch"]
    assert (failing.status_code, healthy.status_code) == (503, 200)  # one replica fails alone


# --------------------------------------------------------------------------- request path


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "redis"])
def test_a_target_whose_probe_fails_is_not_chosen_until_a_probe_passes(
    http, gw_env, replicas, operator_headers, redis_url, shared
):
    """The worker (here on the test's loop: with Redis it could be any host) marks ``b``
    down; the live gateway (its own thread and loop) stops choosing it within its 1 s view
    although ``b`` still answers requests, and chooses it again once a probe passes."""
    a, b = replicas
    gw_env.set(
        VX11_MODULE_SWITCH_URL=f"{a.url},{b.url}", VX11_REDIS_URL=redis_url if shared else None
    )
    services.reset()
    info = pool("switch", a, b)
    b.respond("GET", "/health", status=503)

    async def probe_once() -> None:
        async with probe_transport() as client:
            checker = HealthChecker(
                client, modules=table_of(info), persist=False, mark_healthy=_noop
            )
            await checker.check(info)

    def task_calls(server: UpstreamServer) -> int:
        return sum(1 for seen in server.seen if seen.path == "/switch/task")

    def send(n: int) -> None:
        for _ in range(n):
            r = http.post("/vx11/route/task", json={"prompt": "hi"}, headers=operator_headers)
            assert r.status_code == 200, r.text

    asyncio.run(probe_once())
    send(2)  # the gateway's view of the pool is read (in the background) from here on
    import time

    time.sleep(1.2)
    before = task_calls(b)
    send(30)
    assert task_calls(b) == before  # down: not chosen while a healthy target remains
    assert task_calls(a) >= 30
    b.respond("GET", "/health", status=200)
    asyncio.run(probe_once())
    time.sleep(1.2)
    send(30)
    assert task_calls(b) > before  # up again: chosen again
