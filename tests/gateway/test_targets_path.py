"""Module pools on the request path (SPEC §7, §18): choice, retries elsewhere, ejection, panic.

Three real upstream servers are one module's targets (``VX11_MODULE_SWITCH_URL`` as a list,
or ``Target`` rows for weights); every request goes through the real gateway.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from aiohttp import web

from gateway.core import metrics
from gateway.models import Module, Route, Target
from gateway.upstream import h1
from tests.conftest import OPERATOR_TOKEN, wait_until
from tests.servers import UpstreamServer

H = {"X-VX11-Token": OPERATOR_TOKEN}


def _replica(n: int, port: int | None = None) -> UpstreamServer:
    server = UpstreamServer(port=port) if port else UpstreamServer()

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"replica": n})

    server.route("GET", "/switch/task", answer)
    return server.start()


def key(server: UpstreamServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def replicas(gateway, gw_env) -> Iterator[list[UpstreamServer]]:
    """Three targets of ``switch``; intent ``task`` goes there as a GET (retryable)."""
    servers = [_replica(n) for n in range(3)]
    Route.objects.create(intent="task", method="GET")
    gw_env.set(VX11_MODULE_SWITCH_URL=",".join(s.url for s in servers))
    yield servers
    for s in servers:
        s.stop()


def ask(http: httpx.Client, **headers: str) -> httpx.Response:
    return http.post("/vx11/route/task", headers={**H, **headers})


def spread(http: httpx.Client, n: int, threads: int = 6) -> list[httpx.Response]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: ask(http), range(n)))


def ejections(server: UpstreamServer) -> float:
    return float(metrics.TARGET_EJECTIONS.labels("switch", key(server))._value.get())


def breaker(http: httpx.Client) -> dict[str, object]:
    status = http.get("/vx11/circuit-breaker/status", headers=H).json()
    found: dict[str, object] = status["breakers"]["switch"]
    return found


def test_least_request_spreads_over_three_targets_and_names_the_one_that_answered(
    http, replicas
) -> None:
    answers = spread(http, 240)
    assert {r.status_code for r in answers} == {200}
    by_key = {key(s): n for n, s in enumerate(replicas)}
    for r in answers:  # X-VX11-Target is the host:port that answered
        assert by_key[r.headers["x-vx11-target"]] == r.json()["replica"]
    counts = Counter(r.json()["replica"] for r in answers)
    assert set(counts) == {0, 1, 2}
    assert all(50 <= counts[n] <= 110 for n in range(3)), counts  # 80 each, roughly
    assert all(len(s.seen) == counts[n] for n, s in enumerate(replicas))


def test_round_robin_follows_the_weights_exactly(http, replicas, gw_env) -> None:
    gw_env.set(VX11_MODULE_SWITCH_LB="round_robin")
    row, _ = Module.objects.get_or_create(name="switch")
    for server, weight in zip(replicas, (5, 1, 1), strict=True):
        Target.objects.create(module=row, url=server.url, weight=weight)
    assert wait_until(lambda: ask(http).headers.get("x-vx11-target") is not None)
    for s in replicas:
        s.seen.clear()
    answers = [ask(http) for _ in range(70)]  # ten cycles of a a b a c a a
    counts = Counter(r.json()["replica"] for r in answers)
    assert counts == {0: 50, 1: 10, 2: 10}
    # smooth: the light targets never twice in a row
    order = [r.json()["replica"] for r in answers]
    assert not any(a == b != 0 for a, b in itertools.pairwise(order))


def test_session_affinity_keeps_a_session_on_one_target_and_spreads_sessions(
    http, replicas, gw_env
) -> None:
    gw_env.set(VX11_MODULE_SWITCH_LB="session")
    where: dict[str, set[str]] = {}
    for round_ in range(4):
        for n in range(24):
            r = ask(http, **{"X-VX11-Session": f"conversation-{n}"})
            assert r.status_code == 200, round_
            where.setdefault(f"conversation-{n}", set()).add(r.headers["x-vx11-target"])
    assert all(len(targets) == 1 for targets in where.values()), where
    assert len({next(iter(t)) for t in where.values()}) == 3  # 24 keys over all three


def test_lb_session_without_a_key_of_its_own_is_least_request_not_one_target(
    http, replicas, gw_env
) -> None:
    # With authentication off every caller is the same principal ("auth-disabled"): keyed on
    # it, all traffic without a session would sit on one replica (review finding).
    gw_env.set(VX11_MODULE_SWITCH_LB="session", VX11_AUTH_ENABLED="false")
    seen = set()
    for _ in range(30):
        r = http.post("/vx11/route/task", json={})
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-vx11-target"])
    assert len(seen) > 1, seen


def test_a_stopped_replica_is_retried_ejected_then_returns_and_the_breaker_stays_closed(
    http, replicas, gw_env
) -> None:
    gw_env.set(
        VX11_OUTLIER_CONSECUTIVE_FAILURES="3",
        VX11_OUTLIER_BASE_EJECTION_SECONDS="2",
        VX11_CB_FAILURE_THRESHOLD="1",  # per-attempt counting would open it at once
    )
    dead = replicas[1]
    port = dead.port
    dead.stop()
    answers: list[httpx.Response] = []
    deadline = time.monotonic() + 20
    while not ejections(dead) and time.monotonic() < deadline:
        answers += spread(http, 12, threads=3)
    ejected_at = time.monotonic()
    assert ejections(dead) == 1
    assert {r.status_code for r in answers} == {200}  # every request answered
    assert any(int(r.headers["x-vx11-attempts"]) > 1 for r in answers)  # retried elsewhere
    assert all(r.headers["x-vx11-target"] != f"127.0.0.1:{port}" for r in answers)
    assert breaker(http)["state"] == "closed"  # one bad replica never opened the module's
    back = _replica(1, port)  # the replica is back, but still ejected: it gets nothing
    try:
        quiet = spread(http, 60, threads=3)
        assert time.monotonic() - ejected_at < 1.9, "too slow to observe the ejection"
        assert {r.status_code for r in quiet} == {200}
        assert back.seen == []
        time.sleep(max(0.0, ejected_at + 2.3 - time.monotonic()))  # 2 s + jitter ≤ 10 %
        later = spread(http, 60, threads=3)
        assert {r.status_code for r in later} == {200}
        assert back.seen, "the replica never got traffic again after its ejection ended"
        assert breaker(http)["state"] == "closed"
        text = http.get("/metrics").text
        line = f'vx11_target_ejections_total{{module="switch",target="127.0.0.1:{port}"}} 1.0'
        assert line in text
        counted = [x for x in text.splitlines() if x.startswith("vx11_target_requests_total{")]
        assert any(f'target="127.0.0.1:{port}"' in x and 'status="503"' in x for x in counted)
    finally:
        back.stop()


def test_max_ejection_percent_keeps_the_second_bad_replica_in(http, replicas, gw_env) -> None:
    gw_env.set(VX11_OUTLIER_CONSECUTIVE_FAILURES="2", VX11_OUTLIER_MAX_EJECTION_PERCENT="50")
    replicas[0].stop()
    replicas[1].stop()
    answers = [ask(http) for _ in range(30)]
    assert {r.status_code for r in answers} == {200}
    assert {r.json()["replica"] for r in answers} == {2}
    assert ejections(replicas[0]) + ejections(replicas[1]) == 1  # 3 targets at 50 %: one


def test_panic_when_every_target_is_down_fails_fast_then_reaches_one_back(
    http, replicas, gw_env
) -> None:
    gw_env.set(
        VX11_OUTLIER_CONSECUTIVE_FAILURES="1",
        VX11_OUTLIER_MAX_EJECTION_PERCENT="100",
        VX11_RETRY_MAX="2",
        VX11_CB_FAILURE_THRESHOLD="100",
    )
    ports = [s.port for s in replicas]
    for s in replicas:
        s.stop()
    started = time.monotonic()
    answers = [ask(http) for _ in range(4)]
    assert time.monotonic() - started < 4 * 1.0  # backoff 0.1 + 0.5 s at most each: no hang
    assert {r.status_code for r in answers} == {503}
    assert {r.json()["error"] for r in answers} == {"upstream_unavailable"}
    assert all(r.headers["x-vx11-target"] in {f"127.0.0.1:{p}" for p in ports} for r in answers)
    assert sum(ejections(s) for s in replicas) == 3  # every target ejected: the pool panics
    back = _replica(0, ports[0])
    try:  # still ejected, yet chosen: panic spreads over every enabled target
        assert ask(http).status_code == 200
        assert back.seen
    finally:
        back.stop()


def test_the_breaker_counts_a_request_once_not_each_retried_attempt(http, upstream, gw_env) -> None:
    Route.objects.create(intent="task", method="GET")
    upstream.respond("GET", "/switch/task", status=503)
    r = ask(http)
    assert r.status_code == 503 and r.headers["x-vx11-attempts"] == "4"
    assert r.headers["x-vx11-target"] == f"127.0.0.1:{upstream.port}"
    state = breaker(http)
    assert state["state"] == "closed" and state["failure_count"] == 1
    ask(http)
    ask(http)
    assert breaker(http)["state"] == "open"  # three requests, as before: three failures


def test_a_module_with_every_target_disabled_is_unavailable_at_once(http, replicas) -> None:
    row, _ = Module.objects.get_or_create(name="switch")
    for server in replicas:
        Target.objects.create(module=row, url=server.url, enabled=False)
    assert wait_until(lambda: ask(http).status_code == 503)
    before = [len(s.seen) for s in replicas]
    r = ask(http)
    assert r.json()["error"] == "upstream_unavailable" and "no enabled target" in r.json()["detail"]
    assert [len(s.seen) for s in replicas] == before  # nothing sent
    assert breaker(http)["failure_count"] == 0  # nothing was tried: not the module's failure


async def test_an_origin_no_longer_called_has_its_idle_connections_closed() -> None:
    old, new = UpstreamServer().start(), UpstreamServer().start()
    pool = h1.Pool(idle_timeout=0.05)

    async def get(server: UpstreamServer) -> None:
        response = await pool.request("GET", h1.origin(server.url), "/x", [], None, 5.0, 5.0)
        await response.read()
        response.release()

    try:
        await get(old)
        idle = pool._idle[h1.origin(old.url)][0]
        await asyncio.sleep(0.1)
        await get(new)  # a removed target is never called again: the sweep closes it
        assert h1.origin(old.url) not in pool._idle
        assert idle.transport is None or idle.transport.is_closing()
        assert h1.origin(new.url) in pool._idle
    finally:
        pool.close()
        old.stop()
        new.stop()


def test_lb_session_keys_a_context7_conversation_by_its_session_id(http, replicas, gw_env) -> None:
    """A first turn has no header: the key is the session Context-7 opens for it (not the
    caller, or every conversation of one client would share a replica); later turns, by
    header or by body, stay on that replica."""
    gw_env.set(VX11_MODULE_SWITCH_LB="session")
    first: dict[str, str] = {}
    for n in range(12):
        r = http.post("/vx11/route/chat", json={"message": f"hello {n}"}, headers=H)
        assert r.status_code == 200, r.text
        first[r.headers["x-vx11-session"]] = r.headers["x-vx11-target"]
    assert len(set(first.values())) >= 2  # twelve conversations of one caller spread
    for session, target in first.items():
        by_header = http.post(
            "/vx11/route/chat", json={"message": "again"}, headers={**H, "X-VX11-Session": session}
        )
        by_body = http.post(
            "/vx11/route/chat", json={"message": "more", "session_id": session}, headers=H
        )
        assert by_header.headers["x-vx11-target"] == by_body.headers["x-vx11-target"] == target
