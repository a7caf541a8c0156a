"""CPU per store call of the candidate Redis clients, on the request path's own script.

    python -m bench.redis_clients [--calls 20000] [--concurrency 32]

Why the request path's script calls use ``gateway.state.resp.PipelinedRedis`` and not
redis-py's asyncio client: this runs the rate limiter's Lua script (two scopes, as for
an authenticated request) through each client against one real Redis server started
for the run, from ``concurrency`` concurrent callers on uvloop, and prints the process
CPU time per call. Redis runs in its own process, so its CPU is not counted.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import redis.asyncio as aioredis
import uvloop

from bench.clients import drive
from gateway.state.resp import PipelinedRedis, Script
from gateway.state.scripts import RATE_LIMIT_HIT
from tests.servers import RedisServer

KEYS = ["vx11:rl:token:bench", "vx11:rl:ip:127.0.0.1"]


def script_args(n: int) -> list[Any]:
    now = time.time()
    return [
        repr(now),
        f"{now!r}:{n}",
        1,
        10**9,
        repr(now - 60),
        60_000,
        10**9,
        repr(now - 60),
        60_000,
    ]


async def main(url: str, calls: int, concurrency: int) -> None:
    rows: list[tuple[str, tuple[float, float]]] = []
    client = aioredis.Redis.from_url(url, max_connections=concurrency)
    registered = client.register_script(RATE_LIMIT_HIT.source)

    counter = itertools.count()

    async def redis_py() -> None:
        await registered(keys=KEYS, args=script_args(next(counter)))

    rows.append(("redis-py asyncio (hiredis)", await drive(redis_py, calls, concurrency)))
    await client.aclose()

    fast = PipelinedRedis(url)
    script = Script(RATE_LIMIT_HIT.source)

    async def pipelined() -> None:
        await fast.run_script(script, KEYS, script_args(next(counter)))

    rows.append(("gateway.state.resp.PipelinedRedis", await drive(pipelined, calls, concurrency)))
    await fast.aclose()
    print(f"{'client':30} {'CPU µs/call':>12} {'calls/s':>9}")
    for name, (cpu_us, rate) in rows:
        print(f"{name:30} {cpu_us:12.1f} {rate:9.0f}")
    print(f"PipelinedRedis uses {rows[1][1][0] / rows[0][1][0]:.2f}x the CPU of redis-py per call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    options = parser.parse_args()
    server = RedisServer().start()
    try:
        uvloop.run(main(server.url, options.calls, options.concurrency))
    finally:
        server.close()
