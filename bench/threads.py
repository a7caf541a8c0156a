"""CPU per request of each thread of a gateway under load: where the time goes, by thread.

    .venv/bin/python -m bench.threads [--tree PATH] [--intent chat] [--sessions 32]
        [--seconds 6] [--env NAME=VALUE ...]

Starts one upstream and one gateway (the tree given, this one by default), warms it up, drives
one ``wrk -t1 -c32`` burst and prints, for each thread that used CPU, its user + system time
divided by the requests answered (``/proc/<pid>/task/*/stat``). Used to see whether work handed
to a thread (the Context-7 writer) is paid for on the event loop's thread as well
(docs/PERFORMANCE.md, "Issue #16, third pass").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.ab import burst as drive
from bench.ab import start_gateway
from bench.run import TOKEN, lua_script
from tests.servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


def thread_times(pid: int) -> dict[str, tuple[str, float]]:
    """CPU seconds used so far by each thread of ``pid``: tid → (name, seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[str, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        name = Path(f"{base}/comm").read_text().strip()
        fields = Path(f"{base}/stat").read_text().rsplit(")", 1)[1].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--intent", default="chat", choices=["task", "chat"])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    up = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-c", f"from bench.servers import upstream; upstream({up})"], cwd=ROOT
    )
    try:
        wait_for_port(up)
        extra = dict(item.split("=", 1) for item in args.env)
        proc, port = start_gateway(args.tree.resolve(), f"http://127.0.0.1:{up}", None, extra)
        try:
            lua = Path(tempfile.mkdtemp(prefix="vx11-threads-")) / "load.lua"
            headers = {"Content-Type": "application/json", "X-VX11-Token": TOKEN}
            lua.write_text(lua_script(headers, args.sessions))
            drive(proc.pid, port, 2, str(lua), args.intent)  # warm-up
            before = thread_times(proc.pid)
            requests, cpu = drive(proc.pid, port, args.seconds, str(lua), args.intent)
            after = thread_times(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        upstream.terminate()
        upstream.wait(10)
    print(f"{args.tree}: {requests} requests, {cpu / requests * 1e6:.0f} µs CPU per request")
    for tid, (name, used) in sorted(after.items(), key=lambda item: -item[1][1]):
        spent = used - before.get(tid, (name, 0.0))[1]
        if spent > 0.005:
            role = "event loop" if tid == str(proc.pid) else name  # 3.13 names no OS threads
            print(f"  thread {tid:>8} {role:<20} {spent / requests * 1e6:7.0f} µs/request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
