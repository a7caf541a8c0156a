"""Helpers for the reliability tests: real gateway processes, bounded load, process gauges.

Every test here drives a real ``uvicorn vx11site.asgi:application`` process
(``tests.servers.GatewayProcess``) from an ``httpx.AsyncClient`` over loopback,
with bounded counts and durations. Figures are printed (``-s`` shows them) and
copied into docs/RELIABILITY.md; assertions use generous bounds that still fail
when the property is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODULE_NAMES
from tests.servers import (
    ROOT,
    GatewayProcess,
    PostgresServer,
    UpstreamServer,
    fresh_database_url,
)

logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

#: Distinct, greppable secrets: the tests look for them in the gateway's log output.
TOKEN = "rel-operator-token-7f3a9c2e5b8d1046"
GW_TOKEN = "rel-gateway-token-4c1e8a7d2f9b6053"
OP = {"X-VX11-Token": TOKEN}
GW = {"X-VX11-GW-Token": GW_TOKEN}


def base_env(workdir: str, upstream_url: str, **extra: object) -> dict[str, str]:
    """A gateway configuration: every module at ``upstream_url``, limits out of the way."""
    env = {
        "VX11_VAR_DIR": workdir,
        "VX11_TOKEN": TOKEN,
        "VX11_GATEWAY_TOKEN": GW_TOKEN,
        "DJANGO_SECRET_KEY": "reliability-secret-key-not-a-token-0123456789",
        "VX11_RATE_LIMIT_TOKEN": "1000000",
        "VX11_RATE_LIMIT_IP": "1000000",
        "VX11_RATE_LIMIT_PROTECTED": "1000000",
        "VX11_REDIS_URL": "",
        **{f"VX11_MODULE_{name.upper()}_URL": upstream_url for name in MODULE_NAMES},
    }
    env.update({key: str(value) for key, value in extra.items()})
    return env


_template: dict[str, str] = {}


def prepare_database(env: dict[str, str]) -> None:
    """Give ``env`` a migrated database of its own.

    SQLite (the default pass): one migrated file per test session, copied (a migration
    run costs a second). PostgreSQL (``DATABASE_URL`` given): a fresh database, migrated.
    """
    if env.get("DATABASE_URL"):
        GatewayProcess.migrate(env)
        return
    base = os.environ.get("DATABASE_URL")
    if base and base.startswith("postgres"):
        env["DATABASE_URL"] = fresh_database_url(base, env["VX11_VAR_DIR"])
        GatewayProcess.migrate(env)
        return
    if "path" not in _template:
        folder = tempfile.mkdtemp(prefix="vx11-rel-template-")
        path = os.path.join(folder, "gateway.sqlite3")
        GatewayProcess.migrate({**env, "DATABASE_URL": f"sqlite:///{path}", "VX11_VAR_DIR": folder})
        _template["path"] = path
    target = os.path.join(env["VX11_VAR_DIR"], "gateway.sqlite3")
    shutil.copyfile(_template["path"], target)
    env["DATABASE_URL"] = f"sqlite:///{target}"


def manage(env: dict[str, str], *args: str) -> str:
    """Run a management command with the gateway's configuration; its standard output."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout


class Gateways:
    """Starts gateway processes for one test and stops them all at its end."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.started: list[GatewayProcess] = []

    def env(self, upstream_url: str, **extra: object) -> dict[str, str]:
        env = base_env(self.workdir, upstream_url, **extra)
        prepare_database(env)
        return env

    def start(self, env: dict[str, str]) -> GatewayProcess:
        server = GatewayProcess(env)
        self.started.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.started:
            server.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.when == "call" and report.failed:
        pool = getattr(item, "_gateways", None)
        for server in pool.started if pool else []:
            report.sections.append((f"gateway {server.port} log", server.output()[-6000:]))
    return report


@pytest.fixture
def gateways(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Gateways]:
    pool = Gateways(str(tmp_path))
    request.node._gateways = pool
    yield pool
    pool.stop()


@pytest.fixture
def echo() -> Iterator[UpstreamServer]:
    """A real upstream module (aiohttp): echoes JSON unless a test routes a path."""
    server = UpstreamServer().start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- process gauges


def pid_of(server: GatewayProcess) -> int:
    assert server.proc is not None
    return server.proc.pid


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def metric(exposition: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in exposition.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        found = match.group(2) or ""
        if all(f'{key}="{value}"' in found for key, value in labels.items()):
            total += float(match.group(3))
    return total


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic start time
    latency: float  # seconds
    status: int  # 0: transport error
    error: str = ""


async def load(
    request: Callable[[int], Awaitable[httpx.Response]],
    *,
    concurrency: int,
    duration: float | None = None,
    count: int | None = None,
) -> list[Sample]:
    """Run ``request(i)`` from ``concurrency`` workers until ``duration`` s or ``count`` calls."""
    assert duration is not None or count is not None
    samples: list[Sample] = []
    deadline = time.monotonic() + duration if duration is not None else math.inf
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while time.monotonic() < deadline and (count is None or issued < count):
            index = issued
            issued += 1
            started = time.monotonic()
            try:
                response = await request(index)
                samples.append(Sample(started, time.monotonic() - started, response.status_code))
            except httpx.HTTPError as exc:
                samples.append(Sample(started, time.monotonic() - started, 0, type(exc).__name__))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: list[Sample]) -> str:
    latencies = [s.latency for s in samples]
    statuses: dict[int, int] = {}
    for s in samples:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    return (
        f"n={len(samples)} p50={percentile(latencies, 50) * 1000:.1f}ms "
        f"p99={percentile(latencies, 99) * 1000:.1f}ms max={max(latencies, default=0) * 1000:.1f}ms "
        f"statuses={dict(sorted(statuses.items()))}"
    )


def figure(name: str, text: str) -> None:
    """Print one measured figure (``-s`` shows it; docs/RELIABILITY.md quotes it)."""
    print(f"\n[reliability] {name}: {text}", flush=True)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def await_for(
    predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return await predicate()


def stop_postgres(pg: PostgresServer) -> None:
    """A fast shutdown of the postmaster itself (SIGINT through its pid file).

    ``PostgresServer.stop`` signals the process it started, which as root is ``runuser``;
    runuser does not pass SIGINT on, so the server would keep running.
    """
    pid = int((Path(pg.data) / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)
    if pg.proc is not None:
        pg.proc.wait(20)
        pg.proc = None


def assert_no_traceback(server: GatewayProcess) -> None:
    output = server.output()
    assert "Traceback" not in output, output[-4000:]


# --------------------------------------------------------------------------- raw HTTP


@dataclass(frozen=True)
class RawAnswer:
    status: int  # 0: the server closed the connection without an answer
    headers: dict[str, str]
    body: bytes


async def raw_request(port: int, data: bytes, timeout: float = 10.0) -> RawAnswer:
    """Send bytes as they are (no client-side validation) and read one HTTP/1.1 answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(_read_answer(reader), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_answer(reader: asyncio.StreamReader) -> RawAnswer:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return RawAnswer(0, {}, b"")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    return RawAnswer(status, headers, body)


def request_bytes(
    method: str,
    target: str | bytes,
    headers: Sequence[tuple[str | bytes, str | bytes]],
    body: bytes = b"",
) -> bytes:
    """An HTTP/1.1 request, byte for byte (Host and Content-Length added when missing)."""
    raw_target = target.encode("latin-1") if isinstance(target, str) else target
    lines = [method.encode() + b" " + raw_target + b" HTTP/1.1"]
    names = set()
    for name, value in headers:
        n = name.encode("latin-1") if isinstance(name, str) else name
        v = value.encode("latin-1") if isinstance(value, str) else value
        names.add(n.lower())
        lines.append(n + b": " + v)
    if b"host" not in names:
        lines.append(b"Host: 127.0.0.1")
    if b"content-length" not in names and b"transfer-encoding" not in names:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
