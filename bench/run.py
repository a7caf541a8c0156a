"""Benchmark: the gateway against a bare aiohttp reverse proxy, in one run.

    ./run bench [--duration 10] [--connections 32] [--redis] [--intent task] [--sessions N]

Starts a fast upstream, the reference proxy and the gateway (one uvicorn worker,
uvloop + httptools, every feature that exists switched on), drives each with
wrk (loopback only, bounded duration) and prints req/s, p50/p99 latency, CPU
per request of the proxy process, and the ratios. The reference proxy runs before and
after the gateway; the ratio is against the mean of its two runs. Results are also
written to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.startup import server_command
from tests.servers import RedisServer, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789abcdef"
BODY = '{"prompt":"benchmark","session_id":"bench-1"}'


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float | None
    errors: int
    non_2xx: int
    max_ms: float = 0.0  # the slowest request of the run
    #: Connections to the upstream opened by the measured proxy during the run (warm-up
    #: included): keep-alive reuse shows as about the number of wrk connections.
    upstream_connections: int | None = None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _ms(value: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s|m)$", value)
    if match is None:  # wrk prints -nan when nothing completed
        return float("nan")
    number, unit = match.groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def lua_script(headers: dict[str, str], sessions: int) -> str:
    """wrk's script: the POST, and with ``sessions`` > 1 a body naming the next of that many
    Context-7 sessions in turn (``bench-1`` … ``bench-N``)."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(BODY)}"]
    lines.append('wrk.headers["Content-Type"] = "application/json"')
    lines += [f'wrk.headers["{key}"] = "{value}"' for key, value in headers.items()]
    if sessions > 1:
        lines += [
            "local n = 0",
            "request = function()",
            f"  n = n % {sessions} + 1",
            "  return wrk.format(nil, nil, nil,",
            """    '{"prompt":"benchmark","session_id":"bench-' .. n .. '"}')""",
            "end",
        ]
    return "\n".join(lines) + "\n"


def upstream_connections(upstream_url: str) -> int:
    """How many connections have sent the bench upstream a request so far."""
    url = upstream_url + "/_bench/connections"  # http://127.0.0.1:PORT, built by this script
    with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310
        return int(json.loads(answer.read())["connections"])


def wrk(
    name: str,
    url: str,
    duration: int,
    connections: int,
    pid: int | None,
    headers: dict[str, str],
    sessions: int = 1,
) -> Result:
    lua = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    lua.write(lua_script(headers, sessions))
    lua.close()
    # Warm-up (pools, snapshot, JIT-free caches), not measured.
    subprocess.run(
        ["wrk", "-t1", "-c4", "-d1s", "-s", lua.name, url], capture_output=True, check=False
    )
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", lua.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu1 = cpu_seconds(pid) if pid else 0.0
    os.unlink(lua.name)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx_match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(non2xx_match.group(1)) if non2xx_match else 0
    cpu = (cpu1 - cpu0) / total * 1e6 if pid and total else None
    slowest = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    max_ms = _ms(slowest.group(1)) if slowest else 0.0
    return Result(name, rps, p50, p99, cpu, errors, non2xx, max_ms)


def start(cmd: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_port(port, timeout=30)
    except TimeoutError:
        proc.kill()
        raise SystemExit(
            f"{cmd} did not start: {(proc.stderr.read() if proc.stderr else b'').decode()[-2000:]}"
        ) from None
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--intent",
        default="task",
        help="task (no Context-7) or chat (Context-7 session on every call)",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=1,
        help="With --intent chat: spread the calls over this many sessions in turn (default 1)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Extra gateway setting, e.g. --env VX11_RATE_LIMIT_ENABLED=false",
    )
    parser.add_argument(
        "--redis", action="store_true", help="Run the gateway with shared state in a real Redis"
    )
    args = parser.parse_args()
    if subprocess.run(["which", "wrk"], capture_output=True).returncode != 0:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    redis: RedisServer | None = None
    workdir = tempfile.mkdtemp(prefix="vx11-bench-")
    try:
        up_port, ref_port, gw_port = free_port(), free_port(), free_port()
        procs.append(start([py, "-m", "bench.servers", "upstream", str(up_port)], up_port))
        upstream_url = f"http://127.0.0.1:{up_port}"
        ref = start([py, "-m", "bench.servers", "proxy", str(ref_port), upstream_url], ref_port)
        procs.append(ref)
        env = {
            **os.environ,
            "VX11_TOKEN": TOKEN,
            "VX11_VAR_DIR": workdir,
            "VX11_MODULE_SWITCH_URL": upstream_url,
            "DJANGO_DEBUG": "0",
            "VX11_RATE_LIMIT_TOKEN": "100000000",
            "VX11_RATE_LIMIT_IP": "100000000",
            "VX11_LOG_LEVEL": "WARNING",
        }
        env.pop("DATABASE_URL", None)
        env.update(item.split("=", 1) for item in args.env)
        if args.redis:
            redis = RedisServer().start()
            env["VX11_REDIS_URL"] = redis.url
        subprocess.run([py, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        gateway = start(
            server_command("127.0.0.1", gw_port),
            gw_port,
            env,
        )
        procs.append(gateway)
        path = f"/vx11/route/{args.intent}"
        gw_headers = {"X-VX11-Token": TOKEN}
        results = [
            wrk(
                "direct upstream",
                upstream_url + "/switch/route-v5",
                args.duration,
                args.connections,
                procs[0].pid,
                {},
            )
        ]
        bare: tuple[str, str, int, dict[str, str]] = (
            "bare aiohttp proxy",
            f"http://127.0.0.1:{ref_port}{path}",
            ref.pid,
            {},
        )
        # The reference runs before and after the gateway (A B A): a machine that drifts
        # (the same proxy moved by ±15 % between runs here) moves both halves alike.
        for name, url, pid, headers in (
            bare,
            ("vx11 gateway", f"http://127.0.0.1:{gw_port}{path}", gateway.pid, gw_headers),
            (f"{bare[0]} (again)", *bare[1:]),
        ):
            before = upstream_connections(upstream_url)
            result = wrk(name, url, args.duration, args.connections, pid, headers, args.sessions)
            result.upstream_connections = upstream_connections(upstream_url) - before
            results.append(result)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if redis is not None:
            redis.close()
    direct, ref_result, gw_result, ref_again = results
    reference = (ref_result.rps + ref_again.rps) / 2
    sessions = f", {args.sessions} sessions in turn" if args.sessions > 1 else ""
    print(
        f"\nPOST {path}, {args.connections} connections, {args.duration}s each, "
        f"state: {'redis' if args.redis else 'in-process'}{sessions}"
    )
    print(
        f"{'':27} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU µs/req':>11}"
        f" {'errors':>7} {'upstream conns':>15}"
    )
    for r in results:
        cpu = f"{r.cpu_us_per_req:.0f}" if r.cpu_us_per_req is not None else "-"
        conns = "-" if r.upstream_connections is None else str(r.upstream_connections)
        print(
            f"{r.name:27} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.max_ms:8.1f} {cpu:>11} "
            f"{r.errors + r.non_2xx:7d} {conns:>15}"
        )
    ratio = gw_result.rps / reference
    print(f"\ngateway / bare aiohttp proxy req/s: {ratio:.2f}x (the proxy's two runs averaged)")
    print(f"gateway / direct upstream req/s:    {gw_result.rps / direct.rps:.2f}x")
    print(f"bare proxy / direct upstream req/s: {reference / direct.rps:.2f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "intent": args.intent,
                "sessions": args.sessions,
                "redis": args.redis,
                "connections": args.connections,
                "duration": args.duration,
                "results": [asdict(r) for r in results],
                "ratio_vs_bare_proxy": ratio,
                "bare_proxy_rps_mean": reference,
            },
            indent=2,
        )
    )
    failed = gw_result.errors + gw_result.non_2xx
    if failed:
        print(f"warning: the gateway answered {failed} requests with errors or non-2xx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
