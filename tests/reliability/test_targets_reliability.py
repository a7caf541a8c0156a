"""Outlier ejection agreed by every process and host (SPEC §18), through real gateways.

One module (``shub``) has three targets; one replica stops. Gateway A's traffic ejects it
(the decision is one Lua script in the shared Redis); gateway B — another process on this
host, or another host in its own network namespace — must stop choosing it within a
second, without having failed on it itself: every one of B's requests is then answered at
the first attempt by a live replica.

    .venv/bin/python -m pytest tests/reliability/test_targets_reliability.py -m reliability -s -q
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import httpx
import pytest
import redis

from tests.conftest import GATEWAY_TOKEN
from tests.reliability.conftest import GW, Gateways
from tests.reliability.netns import BridgeUpstream
from tests.reliability.test_multihost import (  # noqa: F401  (fixtures)
    Deployment,
    Lab,
    deploy,
    lab,
)
from tests.servers import UpstreamServer

pytestmark = pytest.mark.reliability

PATH = "/shub/replica-work"
KNOBS = {
    "VX11_OUTLIER_CONSECUTIVE_FAILURES": "3",
    "VX11_OUTLIER_BASE_EJECTION_SECONDS": "30",
    "VX11_RATE_LIMIT_TOKEN": "1000000",
    "VX11_RATE_LIMIT_IP": "1000000",
    "VX11_RATE_LIMIT_PROTECTED": "1000000",
}


def report(scenario: str, figure: str) -> None:
    print(f"\n[targets] {scenario}: {figure}")


def ejected_until(redis_url: str, target: str) -> float:
    """The shared store's end of ``target``'s ejection (0: none): what every process reads."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.hget("vx11:od:shub", f"u:{target}")
    finally:
        client.close()
    return float(raw or 0.0)


async def _eject_through_a_then_ask_b(
    http: httpx.AsyncClient,
    a: str,
    b: str,
    replicas: Sequence[UpstreamServer],
    key: Callable[[UpstreamServer], str],
    redis_url: str,
    headers: dict[str, str],
) -> tuple[float, list[httpx.Response]]:
    """Warm both gateways, stop replica 0, drive A until the store ejects it, then ask B.
    Returns how long the ejection took to decide and B's answers from 1 s after it."""
    for url in (a, b):  # both gateways know the pool and read its view every second
        warm = [await http.get(url + PATH, headers=headers) for _ in range(12)]
        assert {r.status_code for r in warm} == {200}
    dead = replicas[0]
    dead.stop()
    started = time.monotonic()
    through_a: list[httpx.Response] = []
    while not ejected_until(redis_url, key(dead)) and time.monotonic() - started < 15:
        through_a += await asyncio.gather(*(http.get(a + PATH, headers=headers) for _ in range(4)))
    decided = time.monotonic()
    assert ejected_until(redis_url, key(dead)) > time.time() + 20  # 30 s, ejected by A
    assert {r.status_code for r in through_a} == {200}  # A retried its failures elsewhere
    await asyncio.sleep(1.0)  # SPEC §18: every process sees an ejection within 1 s
    on_b = [await http.get(b + PATH, headers=headers) for _ in range(30)]
    return decided - started, on_b


def _check_b(on_b: list[httpx.Response], dead: str) -> None:
    assert {r.status_code for r in on_b} == {200}
    assert {r.headers["x-vx11-attempts"] for r in on_b} == {"1"}, "B still tried the ejected one"
    assert dead not in {r.headers["x-vx11-target"] for r in on_b}
    assert len({r.headers["x-vx11-target"] for r in on_b}) == 2  # the two live replicas


async def test_an_ejection_by_one_process_is_seen_by_another_within_a_second(
    gateways: Gateways, redis_url: str
) -> None:
    replicas = [UpstreamServer().start() for _ in range(3)]
    try:
        env = gateways.env(
            replicas[1].url,
            VX11_REDIS_URL=redis_url,
            VX11_MODULE_SHUB_URL=",".join(s.url for s in replicas),
            **KNOBS,
        )
        a, b = gateways.start(env), gateways.start(env)
        async with httpx.AsyncClient(timeout=30) as http:
            took, on_b = await _eject_through_a_then_ask_b(
                http, a.url, b.url, replicas, lambda s: f"127.0.0.1:{s.port}", redis_url, GW
            )
        report("two processes, one Redis", f"A ejected the stopped replica in {took:.2f} s; "
               f"B 1 s later: {len(on_b)} requests, all first-attempt 200s on the live two")  # fmt: skip
        _check_b(on_b, f"127.0.0.1:{replicas[0].port}")
    finally:
        for s in replicas:
            s.stop()


async def test_an_ejection_decided_on_host_a_is_honoured_by_host_b(
    deploy: Callable[..., Deployment],  # noqa: F811
    lab: Lab,  # noqa: F811
) -> None:
    host = lab.net.gateway_address
    replicas = [BridgeUpstream(host=host).start() for _ in range(3)]
    try:
        hosts = deploy(VX11_MODULE_SHUB_URL=",".join(s.url for s in replicas), **KNOBS)
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            took, on_b = await _eject_through_a_then_ask_b(
                http, hosts.a.url, hosts.b.url, replicas, lambda s: f"{host}:{s.port}",
                lab.redis.url, {"X-VX11-GW-Token": GATEWAY_TOKEN},
            )  # fmt: skip
        report("two hosts, one Redis", f"host A ejected the stopped replica in {took:.2f} s; "
               f"host B 1 s later: {len(on_b)} first-attempt 200s on the live two")  # fmt: skip
        _check_b(on_b, f"{host}:{replicas[0].port}")
    finally:
        for s in replicas:
            s.stop()
