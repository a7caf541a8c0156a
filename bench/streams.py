"""Long streams: one gateway worker holding N concurrent SSE streams (issue #15, SPEC §20).

    .venv/bin/python -m bench.streams [--streams 1000,5000,10000] [--seconds 20] [--clients 2]
        [--env NAME=VALUE] [--tree /tmp/before]

An upstream (aiohttp on uvloop, its own process) answers ``POST /switch/task`` with an SSE
stream of one small event per second, ``data: <epoch seconds when written>``, each stream
at its own phase within the second (no synchronised bursts); the stream lasts until its
reader leaves. ``--clients`` client processes (asyncio streams on uvloop, the file limit
raised as far as the hard limit allows) open N streams in all, wait until every one has
its head, then measure for ``--seconds``: for each event, arrival time minus the
timestamp inside it. Each N runs twice, one after the other: **direct** (clients → upstream)
and **gateway** (clients → one gateway worker → upstream, a fresh gateway per N, started as
``bench.ab`` starts one). Printed per N: the gateway's RSS (before the streams and at the
end of the window), its CPU % over the window, the delay per event p50/p99 both ways and
the difference (the gateway's added delay), events counted, streams that failed.

Only 127.0.0.1, every process is this script's child and is stopped at the end. The
gateway needs two descriptors per stream (client and module side): N is capped by
``RLIMIT_NOFILE``'s hard limit (a larger N is lowered, and says so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ab import ROOT, start_gateway
from bench.run import TOKEN, cpu_seconds
from tests.servers import free_port, wait_for_port

EVENT = re.compile(rb"data: ([0-9.]+)\n\n")
OPEN_AT_ONCE = 200  # connections being opened at a time, per client process


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------- upstream


def upstream(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def sse(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.random())  # this stream's phase within the second
        start = loop.time()
        try:
            for n in range(600):  # bounded: ten minutes at most
                await response.write(b"data: %.6f\n\n" % time.time())
                await asyncio.sleep(max(0.0, start + n + 1 - loop.time()))
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response

    app = web.Application(handler_args={"lingering_time": 0})
    app.router.add_route("*", "/{tail:.*}", sse)
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        backlog=4096,
        loop=uvloop.new_event_loop(),
    )


# --------------------------------------------------------------------------- client


async def _stream(
    port: int, path: str, request: bytes, gate: asyncio.Semaphore, state: dict[str, Any]
) -> None:
    async with gate:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            state["failed"] += 1
            return
        if not head.startswith(b"HTTP/1.1 200"):
            state["failed"] += 1
            writer.close()
            return
    state["writers"].append(writer)
    state["open"] += 1
    if state["open"] == state["wanted"]:
        state["all_open"].set()
    delays: list[float] = state["delays"]
    buffer = b""
    while data := await reader.read(65536):
        now = time.time()
        buffer += data
        end = 0
        if state["from"] <= now <= state["until"]:
            for match in EVENT.finditer(buffer):
                delays.append(now - float(match.group(1)))
                end = match.end()
        else:
            end = buffer.rfind(b"\n\n") + 2 if b"\n\n" in buffer else 0
        buffer = buffer[end:]


async def _clients(port: int, path: str, count: int, seconds: float) -> dict[str, Any]:
    body = b"{}"
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-VX11-Token: {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    state: dict[str, Any] = {
        "wanted": count,
        "open": 0,
        "failed": 0,
        "writers": [],
        "delays": [],
        "from": float("inf"),
        "until": float("inf"),
        "all_open": asyncio.Event(),
    }
    gate = asyncio.Semaphore(OPEN_AT_ONCE)
    tasks = [asyncio.create_task(_stream(port, path, request, gate, state)) for _ in range(count)]
    started = time.monotonic()
    while not state["all_open"].is_set() and time.monotonic() - started < 120:
        if state["open"] + state["failed"] >= count:
            break
        await asyncio.sleep(0.1)
    print("ready", flush=True)  # the coordinator starts its window now
    state["from"] = time.time() + 1.0  # one second to settle (first events of late streams)
    state["until"] = state["from"] + seconds
    await asyncio.sleep(seconds + 1.0)
    still_open = sum(1 for task in tasks if not task.done())
    for writer in state["writers"]:
        writer.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "opened": state["open"],
        "failed": state["failed"],
        "ended_early": state["open"] - still_open,
        "delays": state["delays"],
    }


def client(port: int, path: str, count: int, seconds: float, out: str) -> None:
    import uvloop

    raise_file_limit()
    result = uvloop.run(_clients(port, path, count, seconds))
    Path(out).write_text(json.dumps(result))  # a file: large, and stdout may be non-blocking


# --------------------------------------------------------------------------- coordinator


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phase(
    port: int, path: str, streams: int, seconds: float, procs: int, watch: int | None
) -> dict[str, Any]:
    """N streams from ``procs`` client processes; the watched process's CPU and RSS over
    the measuring window."""
    py = sys.executable
    shares = [streams // procs + (1 if i < streams % procs else 0) for i in range(procs)]
    folder = tempfile.mkdtemp(prefix="vx11-streams-")
    outs = [f"{folder}/client-{i}.json" for i in range(len(shares))]
    clients = [
        subprocess.Popen(
            [py, "-m", "bench.streams", "client", str(port), path, str(n), str(seconds), out],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n, out in zip(shares, outs, strict=True)
        if n
    ]
    try:
        for proc in clients:
            assert proc.stdout is not None
            proc.stdout.readline()  # "ready"
        time.sleep(1.0)  # the clients' settling second
        cpu0, t0 = (cpu_seconds(watch) if watch else 0.0), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = (cpu_seconds(watch) if watch else 0.0), time.monotonic()
        rss = rss_mib(watch) if watch else float("nan")
        for proc in clients:
            proc.wait(timeout=120)
        results = [json.loads(Path(out).read_text()) for out in outs[: len(clients)]]
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for out in outs:
            Path(out).unlink(missing_ok=True)
        Path(folder).rmdir()
    delays = [d * 1000 for r in results for d in r["delays"]]
    return {
        "opened": sum(r["opened"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "ended_early": sum(r["ended_early"] for r in results),
        "events": len(delays),
        "p50": percentile(delays, 0.50),
        "p99": percentile(delays, 0.99),
        "cpu": 100.0 * (cpu1 - cpu0) / (t1 - t0),
        "rss": rss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1000,5000,10000")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--tree", type=Path, default=ROOT, help="the gateway's source tree (a before/after run)"
    )
    args = parser.parse_args()
    hard = raise_file_limit()
    cap = (hard - 200) // 2  # the gateway holds a client and a module socket per stream
    counts = [int(n) for n in args.streams.split(",")]
    py = sys.executable
    up_port = free_port()
    upstream_proc = subprocess.Popen(
        [py, "-m", "bench.streams", "upstream", str(up_port)], cwd=ROOT
    )
    rows: list[tuple[int, dict[str, Any], dict[str, Any], float]] = []
    try:
        wait_for_port(up_port)
        for wanted in counts:
            streams = min(wanted, cap)
            if streams != wanted:
                print(f"N={wanted}: lowered to {streams} (RLIMIT_NOFILE hard limit {hard})")
            direct = phase(up_port, "/switch/task", streams, args.seconds, args.clients, None)
            extra = {
                "VX11_MAX_INFLIGHT": str(streams + 100),
                "VX11_QUEUE_MAX": str(streams + 100),
                "VX11_UPSTREAM_POOL_SIZE": str(streams + 100),
                "VX11_MAX_CONNECTIONS": str(streams + 100),
                "VX11_METRICS_ENABLED": "true",
                **dict(item.split("=", 1) for item in args.env),
            }
            upstream_url = f"http://127.0.0.1:{up_port}"
            gateway, port = start_gateway(args.tree.resolve(), upstream_url, None, extra)
            try:
                time.sleep(1.0)
                idle_rss = rss_mib(gateway.pid)
                through = phase(
                    port, "/vx11/route/stream", streams, args.seconds, args.clients, gateway.pid
                )
            finally:
                gateway.terminate()
                gateway.wait(30)
            rows.append((streams, direct, through, idle_rss))
            report(rows[-1:])
            time.sleep(2.0)  # the upstream's streams notice their readers left
    finally:
        upstream_proc.terminate()
        upstream_proc.wait(30)
    print()
    report(rows)
    return 0


def report(rows: list[tuple[int, dict[str, Any], dict[str, Any], float]]) -> None:
    print(
        "| streams | gateway RSS idle → held | gateway CPU | direct p50 / p99 | "
        "via gateway p50 / p99 | added p50 / p99 | events | failed |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for streams, direct, through, idle in rows:
        print(
            f"| {streams} | {idle:.0f} → {through['rss']:.0f} MiB | {through['cpu']:.0f} % | "
            f"{direct['p50']:.1f} / {direct['p99']:.1f} ms | "
            f"{through['p50']:.1f} / {through['p99']:.1f} ms | "
            f"{through['p50'] - direct['p50']:+.1f} / {through['p99'] - direct['p99']:+.1f} ms | "
            f"{through['events']} | {through['failed'] + through['ended_early']} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "upstream":
        raise_file_limit()
        upstream(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        client(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
    else:
        sys.exit(main())
