"""Soak: mixed traffic for ``VX11_SOAK_SECONDS`` (default 60) with the gateway's RSS and open
file descriptors sampled every second; both must stay flat after warm-up.

``VX11_SOAK_SECONDS`` is read by this test only (it is not a gateway setting): CI runs the
default minute, the manual run takes ten (docs/RELIABILITY.md):

    VX11_SOAK_SECONDS=600 .venv/bin/python -m pytest tests/reliability -m reliability -s -q -k soak
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter

import httpx
import pytest

from tests.reliability.conftest import (
    GW,
    OP,
    Gateways,
    assert_no_traceback,
    figure,
    load,
    metric,
    open_fds,
    percentile,
    pid_of,
    rss_kib,
)
from tests.servers import UpstreamServer

pytestmark = pytest.mark.reliability

# (weight, kind): the mix of one soak worker's requests.
MIX = [
    (40, "task"),
    (15, "chat"),
    (15, "shub health"),
    (5, "stream"),
    (10, "management"),
    (10, "client error"),
    (5, "metrics"),
]
SCHEDULE = [kind for weight, kind in MIX for _ in range(weight)]
CLIENT_ERRORS = [
    ("POST", "/vx11/route/no-such-intent", OP, 404),
    ("POST", "/vx11/route/task", {}, 401),
    ("POST", "/vx11/route/task", {"X-VX11-Token": "rel-wrong-token-0000000000000000"}, 403),
    ("GET", "/shub/a/%2e%2e/b", GW, 400),
    ("GET", "/vx11/route/task", OP, 405),
    ("GET", "/vx11/routes/no-such-intent", OP, 404),
]
MANAGEMENT = [
    "/vx11/routes",
    "/vx11/modules",
    "/vx11/circuit-breaker/status",
    "/vx11/rate-limit/status",
    "/vx11/context-7/sessions",
]


async def test_memory_and_file_descriptors_stay_flat_under_mixed_traffic(
    gateways: Gateways, echo: UpstreamServer, redis_url: str
):
    seconds = max(float(os.environ.get("VX11_SOAK_SECONDS", "60")), 20.0)
    server = gateways.start(gateways.env(echo.url, VX11_REDIS_URL=redis_url))
    pid = pid_of(server)
    kinds: Counter[str] = Counter()
    unexpected: list[str] = []

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def one(i: int) -> httpx.Response:
            kind = SCHEDULE[(i * 37) % len(SCHEDULE)]  # interleaved, deterministic
            kinds[kind] += 1
            if kind == "task":
                answer = await client.post("/vx11/route/task", json={"n": i}, headers=OP)
            elif kind == "chat":
                session = {**OP, "X-VX11-Session": f"soak-{i % 20}"}
                answer = await client.post(
                    "/vx11/route/chat", json={"prompt": f"message {i}"}, headers=session
                )
            elif kind == "shub health":
                answer = await client.get("/shub/health")
            elif kind == "stream":
                answer = await client.post("/vx11/route/stream", json={"i": i}, headers=OP)
            elif kind == "management":
                answer = await client.get(MANAGEMENT[i % len(MANAGEMENT)], headers=OP)
            elif kind == "metrics":
                answer = await client.get("/metrics")
            else:
                method, path, headers, status = CLIENT_ERRORS[i % len(CLIENT_ERRORS)]
                answer = await client.request(method, path, headers=headers)
                if answer.status_code != status:
                    unexpected.append(f"{method} {path}: {answer.status_code}")
                return answer
            if answer.status_code != 200:
                unexpected.append(f"{kind}: {answer.status_code} {answer.text[:200]}")
            return answer

        rss: list[int] = []
        fds: list[int] = []
        running = True

        async def sample() -> None:
            next_at = time.monotonic()
            while running:
                rss.append(rss_kib(pid))
                fds.append(open_fds(pid))
                next_at += 1.0
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        # Warm-up, not sampled: a burst of /metrics scrapes (each reads the database on a
        # worker thread) starts every worker thread and its database connection, which the
        # soak's own traffic would otherwise open one by one over minutes. A client of its
        # own, closed afterwards, so its connections do not linger.
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as burst:
            await load(lambda _: burst.get("/metrics"), concurrency=32, duration=3.0)
        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        samples = await load(one, concurrency=8, duration=seconds)
        elapsed = time.monotonic() - started
        running = False
        await sampler
        exposition = (await client.get("/metrics")).text

    warm_rss, end_rss = statistics.mean(rss[5:15]), statistics.mean(rss[-10:])
    warm_fds, end_fds = statistics.mean(fds[5:15]), statistics.mean(fds[-10:])
    latencies = [s.latency for s in samples]
    statuses = Counter(s.status for s in samples)
    figure(
        "soak",
        f"{len(samples)} requests in {elapsed:.0f}s ({len(samples) / elapsed:.0f}/s), "
        f"mix {dict(kinds)}, statuses {dict(sorted(statuses.items()))}, "
        f"p50={percentile(latencies, 50) * 1000:.1f}ms p99={percentile(latencies, 99) * 1000:.1f}ms "
        f"max={max(latencies) * 1000:.0f}ms",
    )
    figure(
        "soak / RSS",
        f"samples 5-15 mean {warm_rss / 1024:.1f} MiB, last 10 mean {end_rss / 1024:.1f} MiB "
        f"({(end_rss / warm_rss - 1) * 100:+.1f} %), min {min(rss) / 1024:.1f} max "
        f"{max(rss) / 1024:.1f} MiB over {len(rss)} samples",
    )
    figure(
        "soak / open fds",
        f"samples 5-15 mean {warm_fds:.1f}, last 10 mean {end_fds:.1f} "
        f"({(end_fds / warm_fds - 1) * 100:+.1f} %), min {min(fds)} max {max(fds)}",
    )

    assert not unexpected, unexpected[:10]
    assert statuses[0] == 0 and not any(s >= 500 for s in statuses)
    assert abs(end_rss / warm_rss - 1) <= 0.10
    assert abs(end_fds / warm_fds - 1) <= 0.10
    assert metric(exposition, "vx11_inflight_requests") == 0
    assert_no_traceback(server)
