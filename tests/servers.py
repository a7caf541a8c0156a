"""Real servers for tests and benchmarks: Redis, PostgreSQL, upstream modules.

Every server starts on a free loopback port in a temporary folder and is
stopped by PID. Usable from fixtures and as a command line
(``python -m tests.servers redis|postgres``) by the test script.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def _which(name: str, extra: list[str]) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in extra:
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return None


class RedisServer:
    """A private redis-server: no persistence, loopback only."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="vx11-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = _which("redis-server", ["/usr/bin", "/usr/local/bin"])
        if exe is None:
            raise RuntimeError(
                "redis-server not found: install it (Debian: apt-get install -y redis-server)"
            )
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    """A private PostgreSQL cluster (initdb in a temp folder, trust auth on loopback).

    PostgreSQL refuses to run as root, so as root the cluster runs as the
    ``postgres`` system user (created by Debian's package).
    """

    BIN_DIRS = (
        sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)
        if Path("/usr/lib/postgresql").exists()
        else []
    )

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="vx11-pg-")
        self.data = os.path.join(self.dir, "data")
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, args: list[str]) -> list[str]:
        if self._as_postgres:
            return ["runuser", "-u", "postgres", "--", *args]
        return args

    def _exe(self, name: str) -> str:
        exe = _which(name, self.BIN_DIRS)
        if exe is None:
            raise RuntimeError(
                f"{name} not found: install PostgreSQL (Debian: apt-get install -y postgresql)"
            )
        return exe

    def start(self) -> PostgresServer:
        if self._as_postgres:
            shutil.chown(self.dir, "postgres")
        if not os.path.exists(self.data):
            subprocess.run(
                self._cmd(
                    [
                        self._exe("initdb"),
                        "-D",
                        self.data,
                        "-U",
                        "postgres",
                        "-A",
                        "trust",
                        "-E",
                        "UTF8",
                        "--no-sync",
                    ]
                ),
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        self.proc = subprocess.Popen(
            self._cmd(
                [
                    self._exe("postgres"),
                    "-D",
                    self.data,
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    self.dir,
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=30)
        # The port opens before the server accepts queries; wait for a real answer.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = (
                subprocess.run(
                    [self._exe("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ).returncode
                == 0
            )
            if ok:
                return self
            time.sleep(0.05)
        raise TimeoutError("PostgreSQL did not become ready")

    def stop(self) -> None:
        """A fast shutdown (SIGINT) sent to the postmaster itself, by the pid in its
        ``postmaster.pid``: as root the process we started is ``runuser``, which does not
        pass SIGINT on."""
        if self.proc is not None and self.proc.poll() is None:
            pidfile = Path(self.data) / "postmaster.pid"
            try:
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGINT)
            except (OSError, ValueError, IndexError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- upstream


@dataclass
class Seen:
    """One request as the upstream server received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    payload: Any
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = body.decode("utf-8", "replace")
    return web.json_response(
        {
            "echo": payload,
            "path": request.path,
            "method": request.method,
            "query": request.query_string,
        }
    )


@dataclass
class UpstreamServer:
    """A real HTTP upstream (aiohttp) on its own thread and event loop.

    Routes are ``(method, path) -> handler``; unknown paths echo the request as
    JSON. Every request is recorded in ``seen`` (body read unless the handler is
    marked streaming by registering it with ``read_body=False``).
    """

    port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)
    handlers: dict[tuple[str, str], tuple[Handler, bool]] = field(default_factory=dict)
    default: Handler = _echo
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, method: str, path: str, handler: Handler, *, read_body: bool = True) -> None:
        self.handlers[(method.upper(), path)] = (handler, read_body)

    def respond(
        self,
        method: str,
        path: str,
        status: int = 200,
        body: Any = None,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer ``method path`` with a fixed JSON (or bytes) body after ``delay`` seconds."""

        async def handler(request: web.Request) -> web.StreamResponse:
            if delay:
                await asyncio.sleep(delay)
            if isinstance(body, bytes):
                return web.Response(status=status, body=body, headers=headers)
            return web.json_response(
                body if body is not None else {"ok": status < 400}, status=status, headers=headers
            )

        self.route(method, path, handler)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        handler, read_body = self.handlers.get((request.method, request.path), (self.default, True))
        body = await request.read() if read_body else b""
        self.seen.append(
            Seen(
                request.method,
                request.path,
                request.raw_path.partition("?")[2],
                dict(request.headers),
                body,
            )
        )
        return await handler(request)

    def start(self) -> UpstreamServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application(client_max_size=1024**3)
            app.router.add_route("*", "/{tail:.*}", self._dispatch)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            for attempt in range(3):
                site = web.TCPSite(self._runner, "127.0.0.1", self.port)
                try:
                    loop.run_until_complete(site.start())
                    break
                except OSError:  # another xdist worker took the free port meanwhile
                    if attempt == 2:
                        raise
                    self.port = free_port()
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=f"upstream-{self.port}")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self._thread = None


def _main(argv: list[str]) -> int:
    """``python -m tests.servers redis|postgres``: start one, print its URL, run until killed."""
    kind = argv[1] if len(argv) > 1 else ""
    server: RedisServer | PostgresServer
    if kind == "redis":
        server = RedisServer().start()
    elif kind == "postgres":
        server = PostgresServer().start()
    else:
        print("usage: python -m tests.servers redis|postgres", file=sys.stderr)
        return 2
    print(server.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))


# --------------------------------------------------------------------------- gateway processes

ROOT = Path(__file__).resolve().parent.parent


def fresh_database_url(base_url: str | None, workdir: str) -> str:
    """A new empty database: a database in the PostgreSQL at ``base_url``, else a SQLite file."""
    if base_url and base_url.startswith("postgres"):
        import uuid

        import psycopg

        name = "vx11_mp_" + uuid.uuid4().hex[:10]
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return base_url.rsplit("/", 1)[0] + "/" + name
    return f"sqlite:///{workdir}/gateway.sqlite3"


class GatewayProcess:
    """A real gateway: ``uvicorn vx11site.asgi:application`` in its own OS process."""

    def __init__(
        self,
        env: dict[str, str],
        port: int | None = None,
        workers: int = 1,
        server_args: tuple[str, ...] = (),
    ) -> None:
        self._port_given = port
        self.port = port or free_port()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "VX11_LOG_LEVEL": "WARNING", **env}
        self.workers = workers
        #: More uvicorn options, e.g. ``("--timeout-keep-alive", "1")``.
        self.server_args = server_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="vx11-gw-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def migrate(env: dict[str, str]) -> None:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
        )

    def start(self) -> GatewayProcess:
        """Start the server; a port another test took meanwhile means a retry on a new one.

        ``free_port()`` only promises the port was free when it was asked; with xdist
        another worker's upstream may bind it first. Readiness therefore means *this*
        gateway answered ``/health`` (its own JSON, not any 200), and a gateway that exits
        because the address is in use is started again on a fresh port.
        """
        for attempt in range(3):
            if self._start_once():
                return self
            if attempt < 2 and self._port_given is None:
                self.port = free_port()
                continue
            break
        raise RuntimeError(
            f"gateway could not bind 127.0.0.1:{self.port}:\n{self.output()[-3000:]}"
        )

    def _start_once(self) -> bool:
        from gateway.startup import server_command

        log_start = Path(self.log.name).stat().st_size
        self.proc = subprocess.Popen(
            server_command(
                "127.0.0.1",
                self.port,
                self.workers,
                "--timeout-graceful-shutdown",
                "2",
                *self.server_args,
            ),
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        # Ready means /health answers (with --workers the supervisor binds the port
        # before any worker has loaded the app); a process that exits fails at once.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                output = self.output()
                if "address already in use" in output[log_start:].lower():
                    return False
                raise RuntimeError(f"gateway exited ({code}):\n{output[-3000:]}")
            try:
                answer = httpx.get(self.url + "/health", timeout=1)
                if answer.status_code == 200 and answer.json().get("module") == "vx11-gateway":
                    return True
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gateway did not start:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
