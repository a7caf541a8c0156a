"""CPU per request of the candidate upstream clients, against the same fast upstream.

    python -m bench.clients [--requests 5000] [--concurrency 32]

Why the proxy hot path uses its own HTTP/1.1 client (gateway/upstream/h1.py) for bodies in memory,
aiohttp's client for streamed bodies, and not httpx: this measures process CPU time per
POST round trip for httpx.AsyncClient, aiohttp.ClientSession and gateway.upstream.h1.Pool, each
with pooled connections, on uvloop, in one run. The upstream runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import uvloop

from gateway.upstream import h1
from tests.servers import free_port, wait_for_port

BODY = b'{"prompt":"benchmark"}'


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(
    call: Callable[[], Awaitable[None]], requests: int, concurrency: int
) -> tuple[float, float]:
    for _ in range(200):  # warm-up: pool, parsers
        await call()
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            await call()

    cpu0, wall0 = cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (cpu() - cpu0) / requests * 1e6, requests / (time.perf_counter() - wall0)


async def main(requests: int, concurrency: int, url: str) -> None:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:

        async def httpx_call() -> None:
            r = await client.post(url, content=BODY, headers={"Content-Type": "application/json"})
            await r.aread()

        hx = await drive(httpx_call, requests, concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def aiohttp_call() -> None:
            async with session.post(
                url, data=BODY, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()

        ah = await drive(aiohttp_call, requests, concurrency)
    pool = h1.Pool(limit=concurrency)
    origin = h1.origin(url.rsplit("/", 1)[0])
    headers = [("Content-Type", "application/json")]

    async def h1_call() -> None:
        response = await pool.request("POST", origin, "/x", headers, BODY, 30.0, 10.0)
        await response.read()
        response.release()

    own = await drive(h1_call, requests, concurrency)
    pool.close()
    print(f"{'client':12} {'CPU µs/request':>15} {'req/s':>8}")
    print(f"{'httpx':12} {hx[0]:15.0f} {hx[1]:8.0f}")
    print(f"{'aiohttp':12} {ah[0]:15.0f} {ah[1]:8.0f}")
    print(f"{'gateway.upstream.h1':12} {own[0]:15.0f} {own[1]:8.0f}")
    print(f"aiohttp uses {ah[0] / hx[0]:.2f}x the CPU of httpx per request")
    print(f"gateway.upstream.h1 uses {own[0] / ah[0]:.2f}x the CPU of aiohttp per request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.servers", "upstream", str(port)])
    try:
        wait_for_port(port)
        uvloop.run(main(args.requests, args.concurrency, f"http://127.0.0.1:{port}/x"))
    finally:
        upstream.terminate()
        upstream.wait(10)
