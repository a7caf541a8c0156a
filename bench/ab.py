"""Before/after on one machine: two gateway trees side by side, driven in alternating bursts.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.ab --before /tmp/before [--redis] [--bursts 8] [--seconds 3]
        [--intent chat [--sessions 32]] [--env DATABASE_URL=…]
        [--collector --after-env OTEL_EXPORTER_OTLP_ENDPOINT={collector}]
    .venv/bin/python -m bench.ab --targets 3 [--redis]   # a module pool against one target

With ``--targets N`` (N > 1) this tree's gateway calls a module of N targets — N ports of
the one upstream process, so both gateways have the same upstream CPU behind them — and ``--before`` defaults to this tree with the usual single target: the
cost of choosing among targets, counting them in flight and reporting their outcomes, in one
run (SPEC §18; docs/PERFORMANCE.md "Module pools").

``bench.run`` compares the gateway with a bare proxy run before and after it; on a noisy
machine the reference itself moves by ±10 % between runs, and so does the ratio. Here both gateways
(the tree given as ``--before`` and this one) run at the same time against one upstream,
each with its own SQLite file (and its own Redis with ``--redis``), and ``wrk`` drives them
in alternating bursts (A B, B A, …), so slow phases of the machine hit both. Printed: req/s
and the gateway process's CPU time per request, over all bursts and per burst.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import TOKEN, cpu_seconds, lua_script
from tests.servers import RedisServer, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
LUA = f"""wrk.method = "POST"
wrk.body = '{{"prompt":"benchmark","session_id":"bench-1"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-VX11-Token"] = "{TOKEN}"
"""


def start_gateway(
    tree: Path, upstream: str, redis_url: str | None, extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "VX11_TOKEN": TOKEN,
        "VX11_VAR_DIR": tempfile.mkdtemp(prefix="vx11-ab-"),
        "VX11_MODULE_SWITCH_URL": upstream,
        "DJANGO_DEBUG": "0",
        "VX11_RATE_LIMIT_TOKEN": "100000000",
        "VX11_RATE_LIMIT_IP": "100000000",
        "VX11_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(tree),
    }
    env.pop("DATABASE_URL", None)
    env.update(extra or {})
    if redis_url:
        env["VX11_REDIS_URL"] = redis_url
    py = sys.executable
    subprocess.run([py, "manage.py", "migrate", "-v0"], cwd=tree, env=env, check=True)
    # Each tree's own server command line (the flags may differ between commits).
    script = (
        "from gateway.startup import server_command; "
        f"print(chr(0).join(server_command('127.0.0.1', {port})))"
    )
    cmd = subprocess.run(
        [py, "-c", script], cwd=tree, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    proc = subprocess.Popen(cmd.split("\0"), cwd=tree, env=env)
    wait_for_port(port)
    return proc, port


def burst(pid: int, port: int, seconds: int, lua: str, intent: str = "task") -> tuple[int, float]:
    before = cpu_seconds(pid)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c32",
            f"-d{seconds}s",
            "-s",
            lua,
            f"http://127.0.0.1:{port}/vx11/route/{intent}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = cpu_seconds(pid) - before
    done = next(line for line in out.splitlines() if "requests in" in line)
    if "Non-2xx" in out:
        raise SystemExit(f"non-2xx answers on port {port}:\n{out}")
    return int(done.split()[0]), used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the other tree (a worktree)")
    parser.add_argument(
        "--targets", type=int, default=1, help="this tree's module has N targets (upstreams)"
    )
    parser.add_argument("--redis", action="store_true")
    parser.add_argument("--bursts", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--intent", default="task", choices=["task", "chat"])
    parser.add_argument("--sessions", type=int, default=1, help="chat: sessions in turn")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="for both gateways (e.g. DATABASE_URL; both then share that database)",
    )
    parser.add_argument(
        "--after-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="for this tree's gateway only ({collector} in VALUE: the --collector's URL)",
    )
    parser.add_argument(
        "--collector",
        action="store_true",
        help="start an OTLP/HTTP receiver that discards what it gets (tracing cost)",
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    collector_port = free_port()
    after_extra = {
        name: value.replace("{collector}", f"http://127.0.0.1:{collector_port}")
        for name, value in (item.split("=", 1) for item in args.after_env)
    }
    if args.before is None and args.targets < 2:
        parser.error("--before is required (unless --targets N compares N targets against one)")
    trees = {"before": (args.before or ROOT).resolve(), "after": ROOT}
    py = sys.executable
    up_ports = [free_port() for _ in range(max(1, args.targets))]
    up_port = up_ports[0]
    procs: list[subprocess.Popen[bytes]] = [  # one process; a pool's targets are its ports
        subprocess.Popen([py, "-m", "bench.servers", "upstream", *map(str, up_ports)], cwd=ROOT)
    ]
    pool_url = ",".join(f"http://127.0.0.1:{port}" for port in up_ports)
    if args.collector:
        procs.append(
            subprocess.Popen(
                [py, "-m", "bench.servers", "collector", str(collector_port)], cwd=ROOT
            )
        )
    redises: list[RedisServer] = []
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(lua_script({"X-VX11-Token": TOKEN}, args.sessions) if args.sessions > 1 else LUA)
    try:
        for port in up_ports:
            wait_for_port(port)
        gateways: dict[str, tuple[int, int]] = {}
        for name, tree in trees.items():
            redis_url = None
            if args.redis:
                redises.append(RedisServer().start())
                redis_url = redises[-1].url
            own = {**extra, **after_extra} if name == "after" else extra
            module_url = pool_url if name == "after" else f"http://127.0.0.1:{up_port}"
            proc, port = start_gateway(tree, module_url, redis_url, own)
            procs.append(proc)
            gateways[name] = (proc.pid, port)
        for pid, port in gateways.values():
            burst(pid, port, 2, lua.name, args.intent)  # warm-up: pools, snapshot, breaker keys
        totals: dict[str, list[float]] = {name: [0, 0.0] for name in gateways}
        per_burst: dict[str, list[int]] = {name: [] for name in gateways}
        for i in range(args.bursts):
            for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                count, used = burst(*gateways[name], args.seconds, lua.name, args.intent)
                totals[name][0] += count
                totals[name][1] += used
                per_burst[name].append(round(used / count * 1e6))
        mode = ("redis" if args.redis else "in-process") + f" {args.intent}"
        if args.sessions > 1:
            mode += f" ×{args.sessions}"
        if args.targets > 1:
            mode += f" (after: {args.targets} targets, before: 1)"
        for name, (requests, cpu) in totals.items():
            print(
                f"{mode} {name:6}: {requests / (args.bursts * args.seconds):6.0f} req/s, "
                f"{cpu / requests * 1e6:4.0f} µs CPU/req; per burst {per_burst[name]}"
            )
        change = (
            totals["after"][1] / totals["after"][0] / (totals["before"][1] / totals["before"][0])
        )
        print(f"CPU per request, after / before: {change:.3f}")
        print(f"req/s, after / before: {totals['after'][0] / totals['before'][0]:.3f}")
    finally:
        for proc in reversed(procs):  # the gateways first: their last exports still land
            proc.terminate()
            proc.wait(10)
        for server in redises:
            server.close()
        os.unlink(lua.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
