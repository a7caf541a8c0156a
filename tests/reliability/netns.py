"""Several hosts on one machine: Linux network namespaces joined by a bridge.

``NetLab`` builds, per test run, a bridge in the root namespace (``10.77.K.1/24``) and one
network namespace per "host" (``10.77.K.2``, ``.3`` …), each joined to the bridge by a veth
pair. Names carry the test process id (``vx11t<pid>…``) so parallel runs never collide, and
teardown deletes exactly those names. The shared services run in the root namespace but listen
on the bridge address: :class:`BridgeRedis`, :class:`BridgePostgres` (a ``pg_hba`` line trusts
the subnet) and :class:`BridgeUpstream` (an upstream that also records each request's source
address, so a test can tell which host sent it). :class:`NsProcess` runs a command inside one
namespace (``ip netns exec NAME …``); :class:`NsGateway` and :class:`NsHealthWorker` are the
gateway and the health-check worker started that way.

Needs root (CAP_NET_ADMIN) and iproute2's ``ip``; :func:`require_netns` fails the test with a
clear message when either is missing, rather than skipping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from gateway.startup import server_command
from tests.servers import (
    ROOT,
    PostgresServer,
    RedisServer,
    UpstreamServer,
    wait_for_port,
)

GATEWAY_PORT = 8000  # every namespace has its own port space


def require_netns() -> str:
    """The path of ``ip``; fails the test (never skips) when namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.fail(
            "multi-host reliability tests build network namespaces and need root "
            "(CAP_NET_ADMIN); run them as root, as CI does",
            pytrace=False,
        )
    ip = shutil.which("ip")
    if ip is None:
        pytest.fail(
            "multi-host reliability tests need iproute2's `ip` "
            "(Debian: apt-get install -y iproute2)",
            pytrace=False,
        )
    return ip


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> str:
    """``10.77.K`` for the lowest K no interface of this machine uses yet."""
    used = _run("ip", "-4", "-o", "addr", "show")
    for k in range(256):
        prefix = f"10.77.{k}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.77.K.0/24 subnet")


@dataclass
class Host:
    """One namespace: its name and its address on the bridge."""

    name: str
    address: str

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


@dataclass
class NetLab:
    """A bridge in the root namespace and one namespace per host, removed by name."""

    tag: str = field(default_factory=lambda: f"vx11t{os.getpid()}")
    subnet: str = ""
    hosts: list[Host] = field(default_factory=list)
    _links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def gateway_address(self) -> str:
        """The root namespace's address on the bridge (where the shared services listen)."""
        return f"{self.subnet}.1"

    @property
    def cidr(self) -> str:
        return f"{self.subnet}.0/24"

    def up(self, count: int) -> NetLab:
        require_netns()
        self.subnet = self.subnet or _free_subnet()
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._links.append(self.bridge)
            _run("ip", "addr", "add", f"{self.gateway_address}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i in range(count):
                self._add_host(chr(ord("a") + i), i + 2)
        except RuntimeError as exc:
            self.down()
            pytest.fail(
                f"could not build the test network (namespaces, veth, bridge): {exc}",
                pytrace=False,
            )
        return self

    def _add_host(self, letter: str, octet: int) -> None:
        ns = f"{self.tag}{letter}"
        outer, inner = f"{self.tag}{letter}0", f"{self.tag}{letter}1"
        _run("ip", "netns", "add", ns)
        self.hosts.append(Host(ns, f"{self.subnet}.{octet}"))
        _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self._links.append(outer)
        _run("ip", "link", "set", inner, "netns", ns)
        _run("ip", "link", "set", outer, "master", self.bridge)
        _run("ip", "link", "set", outer, "up")
        inside = ["ip", "netns", "exec", ns, "ip"]
        _run(*inside, "addr", "add", f"{self.subnet}.{octet}/24", "dev", inner)
        _run(*inside, "link", "set", inner, "up")
        _run(*inside, "link", "set", "lo", "up")

    def down(self) -> None:
        for host in reversed(self.hosts):
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True, check=False)
        for link in reversed(self._links):  # a veth goes with its namespace; the bridge stays
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        self.hosts.clear()
        self._links.clear()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run still present (teardown checks it is none)."""
        names = _run("ip", "netns", "list") + _run("ip", "-o", "link", "show")
        return sorted({w.split("@")[0] for w in names.split() if w.startswith(self.tag)})


# --------------------------------------------------------------------------- shared services


class BridgeRedis(RedisServer):
    """A private redis-server listening on the bridge address only."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> BridgeRedis:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (Debian: apt-get install -y redis-server)")
        self.proc = subprocess.Popen(
            [
                exe,
                *("--port", str(self.port), "--bind", self.host),
                *("--save", "", "--appendonly", "no", "--dir", self.dir),
                *("--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, host=self.host)
        return self

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()


class BridgePostgres(PostgresServer):
    """A private PostgreSQL cluster on the bridge address, trusting the test subnet."""

    def __init__(self, host: str, cidr: str) -> None:
        super().__init__()
        self.host = host
        self.cidr = cidr

    @property
    def url(self) -> str:
        return f"postgres://postgres@{self.host}:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgres://postgres@{self.host}:{self.port}/{name}"

    def start(self) -> BridgePostgres:
        if self._as_postgres:
            shutil.chown(self.dir, "postgres")
        subprocess.run(
            self._cmd(
                [
                    self._exe("initdb"),
                    *("-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8"),
                    "--no-sync",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        hba = Path(self.data) / "pg_hba.conf"
        with hba.open("a") as f:
            f.write(f"host all all {self.cidr} trust\n")
        self.proc = subprocess.Popen(
            self._cmd(
                [
                    self._exe("postgres"),
                    *("-D", self.data, "-p", str(self.port), "-h", self.host, "-k", self.dir),
                    *("-c", "fsync=off", "-c", "synchronous_commit=off"),
                    *("-c", "full_page_writes=off", "-c", "max_connections=300"),
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=30, host=self.host)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [self._exe("pg_isready"), "-h", self.host, "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            if ready.returncode == 0:
                return self
            time.sleep(0.05)
        raise TimeoutError("PostgreSQL did not become ready")

    def stop(self) -> None:
        """A fast shutdown of the postmaster itself, by the pid in its ``postmaster.pid``.

        As root the process started is ``runuser``, which does not pass SIGINT on.
        """
        pidfile = Path(self.data) / "postmaster.pid"
        if self.proc is not None and self.proc.poll() is None and pidfile.exists():
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def create_database(self, name: str, template: str | None = None) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            clause = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{clause}')
        return self.database_url(name)


@dataclass
class BridgeUpstream(UpstreamServer):
    """The test upstream, bound to the bridge address; records who sent each request.

    ``remotes`` holds ``(monotonic time, method, path, source address)`` per request.
    """

    host: str = "127.0.0.1"
    remotes: list[tuple[float, str, str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def from_address(self, path: str, since: float = 0.0) -> dict[str, int]:
        """Requests for ``path`` received since ``since`` (monotonic), per source address."""
        counts: dict[str, int] = {}
        for at, _method, p, remote in list(self.remotes):
            if p == path and at >= since:
                counts[remote] = counts.get(remote, 0) + 1
        return counts

    def first_from(self, path: str, remote: str, since: float) -> float | None:
        for at, _method, p, who in list(self.remotes):
            if p == path and who == remote and at >= since:
                return at
        return None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.remotes.append((time.monotonic(), request.method, request.path, request.remote or ""))
        return await super()._dispatch(request)

    def start(self) -> BridgeUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application(client_max_size=1024**2)
            app.router.add_route("*", "/{tail:.*}", self._dispatch)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=f"upstream-{self.port}")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"upstream did not start on {self.host}:{self.port}")
        return self

    def reset(self) -> None:
        self.seen.clear()
        self.remotes.clear()
        self.handlers.clear()


# --------------------------------------------------------------------------- processes


def clean_environ() -> dict[str, str]:
    """The test process's environment without the gateway's own settings."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VX11_", "DJANGO_")) and k != "DATABASE_URL"
    }


class NsProcess:
    """A command run inside one namespace with ``ip netns exec`` (which execs it: same pid)."""

    def __init__(self, host: Host, args: list[str], env: dict[str, str], label: str) -> None:
        self.host = host
        self.args = args
        self.env = {**clean_environ(), "PYTHONUNBUFFERED": "1", **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"vx11-{label}-", suffix=".log", delete=False)

    def start(self) -> NsProcess:
        self.proc = subprocess.Popen(
            [*self.host.prefix(), *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL to the process itself, nothing released."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


class NsGateway(NsProcess):
    """The gateway's server command line on the namespace's own address."""

    def __init__(self, host: Host, env: dict[str, str]) -> None:
        args = server_command(host.address, GATEWAY_PORT, 1, "--timeout-graceful-shutdown", "2")
        super().__init__(host, args, env, "gw")

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{GATEWAY_PORT}"

    def start(self) -> NsGateway:
        super().start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            wait_for_port(GATEWAY_PORT, timeout=timeout, host=self.host.address)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"gateway in {self.host.name} did not start:\n{self.output()[-3000:]}"
            ) from None


class NsHealthWorker(NsProcess):
    """``manage.py run_health_checks`` inside the namespace."""

    def __init__(self, host: Host, env: dict[str, str]) -> None:
        super().__init__(host, [sys.executable, "manage.py", "run_health_checks"], env, "health")


def migrate(database_url: str, env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=ROOT,
        env={**clean_environ(), **env, "DATABASE_URL": database_url},
        check=True,
    )


__all__ = [
    "GATEWAY_PORT",
    "BridgePostgres",
    "BridgeRedis",
    "BridgeUpstream",
    "Host",
    "NetLab",
    "NsGateway",
    "NsHealthWorker",
    "NsProcess",
    "clean_environ",
    "migrate",
    "require_netns",
]
