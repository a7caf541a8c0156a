"""A lean HTTP/1.1 client for the proxy's upstream calls whose request body is in memory.

Why it exists: aiohttp's client was the largest single cost of a proxied request — ≈ 37 %
of the gateway's CPU samples, ≈ 90 µs per request (request object, URL handling, timer
and trace machinery, header multidicts, a StreamReader per response), more than the bare
reference proxy spends on everything else. A proxy needs much less: write the request
head and body in one ``write``, parse the answer with ``httptools`` (llhttp, in C — the
parser uvicorn uses), keep connections alive in a per-host pool, stream large answers with
flow control. ``python -m bench.clients`` measures it against aiohttp and httpx.

What it does, and what it leaves to aiohttp (``gateway.upstream`` chooses):

- request bodies given as ``bytes`` (or none). A streamed request body (large, or
  chunked from the client) goes through aiohttp, which streams it with back-pressure;
- ``http`` and ``https`` (TLS with the system's default verification);
- answers sized by ``Content-Length``, chunked, or delimited by the connection's close;
  ``1xx`` interim answers skipped; answers to ``HEAD`` never reuse the connection (the
  parser cannot be told a bodiless answer is coming);
- one deadline for the whole exchange (connect, head and body), a separate connect
  timeout; the connection is aborted when the deadline passes or the caller gives up;
- a connection returns to the pool only after a complete answer that allows keep-alive;
  idle connections are dropped after ``idle_timeout`` seconds or when the module closes
  them;
- no redirects, no decompression, no headers added besides ``Host`` and ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools

#: A streamed answer pauses reading from the module above this many buffered bytes.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class UpstreamClosed(ConnectionError):
    """The module closed the connection before its answer was complete."""


class UpstreamProtocolError(ConnectionError):
    """The module's answer is not valid HTTP/1.1."""


class ConnectFailed(OSError):
    """No connection to the module (refused, unreachable, DNS, TLS handshake)."""


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int
    base_path: str
    host_header: bytes


@lru_cache(maxsize=256)
def origin(base_url: str) -> Origin:
    """``scheme://host:port/base`` split once per module URL."""
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    return Origin(scheme, host, port, parts.path.rstrip("/"), host_header.encode("idna"))


_tls: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _tls
    if _tls is None:
        _tls = ssl.create_default_context()
    return _tls


class Connection(asyncio.Protocol):
    """One connection to a module; one exchange at a time."""

    __slots__ = (
        "body",
        "body_size",
        "complete",
        "error",
        "head",
        "headers",
        "idle_since",
        "key",
        "loop",
        "parser",
        "paused",
        "reusable",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Origin) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] | None = None
        self.body: deque[bytes] = deque()
        self.body_size = 0
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.error: BaseException | None = None
        self.paused = False
        self.reusable = True

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.head is None:  # idle: a module must not speak unasked
            self.reusable = False
            self._abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("the module switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if self.complete or self.error is not None:
            self._wake()
            return
        if self.head is None:
            return  # idle connection closed by the module: the pool drops it
        if self.head.done() and self._until_close():
            self.complete = True  # a close-delimited body ends with the connection
            self._wake()
            return
        self._fail(
            UpstreamClosed(f"the module closed the connection{': ' + str(exc) if exc else ''}")
        )

    # ------------------------------------------------------------------ httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim answer (100 Continue, 103 Early Hints): skip it
            self.headers = []
            return
        self.status = status
        if not self.parser.should_keep_alive():
            self.reusable = False
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.body_size += len(body)
        if self.body_size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:  # the end of an interim answer
            return
        self.complete = True
        self._wake()

    # ------------------------------------------------------------------ helpers

    def _until_close(self) -> bool:
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (
                lname == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.reusable = False
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: no "never retrieved" warning if unawaited
        self._wake()
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    def timed_out(self) -> None:
        self._fail(TimeoutError("the module's answer did not complete in time"))

    # ------------------------------------------------------------------ one exchange

    def send(self, data: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self._reset()
        self.head = self.loop.create_future()
        self.transport.write(data)
        return self.head

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, ``None`` at its end."""
        while True:
            if self.body:
                chunk = self.body.popleft()
                self.body_size -= len(chunk)
                if self.paused and self.body_size < LOW_WATER and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:  # whole: a later error (a stray byte, the timer) is moot
                return None
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None


class Response:
    """An answer whose body is read by the caller; ``release`` or ``close`` ends it."""

    __slots__ = ("_done", "_pool", "_timer", "conn", "headers", "method", "status")

    def __init__(
        self, pool: Pool, conn: Connection, method: str, timer: asyncio.TimerHandle
    ) -> None:
        self._pool = pool
        self.conn = conn
        self.method = method
        self.status = conn.status
        self.headers = conn.headers
        self._timer = timer
        self._done = False

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    def content_length(self) -> int | None:
        if self.method == "HEAD" or self.status in (204, 304):
            return 0
        value = self.header("Content-Length")
        if value is None or not value.isdigit():
            return None
        return int(value)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        if self.method == "HEAD":
            return
        while (chunk := await self.conn.next_chunk()) is not None:
            yield chunk

    async def read(self) -> bytes:
        """The whole body (the caller has checked its size)."""
        conn = self.conn
        if self.method == "HEAD":
            return b""
        if conn.complete:  # the common case: the body came with the head
            parts = list(conn.body)
            conn.body.clear()
            conn.body_size = 0
            return parts[0] if len(parts) == 1 else b"".join(parts)
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def release(self) -> None:
        """The body was read: the connection goes back to the pool if it can."""
        if self._done:
            return
        self._done = True
        self._timer.cancel()
        conn = self.conn
        if conn.complete and conn.error is None and conn.reusable and self.method != "HEAD":
            self._pool.put(conn)
        else:
            conn._abort()
            self._pool.forget()

    def close(self) -> None:
        """Abandon the answer: the connection is closed (the module sees its client go)."""
        if self._done:
            return
        self._done = True
        self._timer.cancel()
        self.conn._abort()
        self._pool.forget()


class Pool:
    """Keep-alive connections per module origin, for one event loop."""

    def __init__(self, limit: int = 256, idle_timeout: float = 30.0) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._idle: dict[Origin, list[Connection]] = {}
        self._slots = asyncio.Semaphore(limit)
        self.loop: asyncio.AbstractEventLoop | None = None

    def put(self, conn: Connection) -> None:
        conn.head = None
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._slots.release()

    def forget(self) -> None:
        self._slots.release()

    def _take(self, key: Origin) -> Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        cutoff = time.monotonic() - self.idle_timeout
        while idle:
            conn = idle.pop()  # most recently used first: the warmest connection
            alive = conn.transport is not None and not conn.transport.is_closing()
            if alive and conn.idle_since >= cutoff:
                return conn
            conn._abort()
        return None

    async def _connect(self, key: Origin, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, key),
                    key.host,
                    key.port,
                    ssl=_tls_context() if key.scheme == "https" else None,
                    server_hostname=key.host if key.scheme == "https" else None,
                )
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc) or type(exc).__name__) from exc
        return conn

    async def request(
        self,
        method: str,
        key: Origin,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        timeout: float,
        connect_timeout: float,
    ) -> Response:
        """Send one request and wait for the answer's head (the body is read later).

        Raises ``TimeoutError`` (deadline), ``ConnectFailed``, ``UpstreamClosed`` or
        ``UpstreamProtocolError``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        data = _request_head(method, key, target, headers, body)
        if body is not None:
            data += body
        if self._slots.locked():  # every connection busy: wait, but not past the deadline
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        conn: Connection | None = None
        timer: asyncio.TimerHandle | None = None
        try:
            conn = self._take(key)
            if conn is not None:
                timer = loop.call_at(deadline, conn.timed_out)
                try:
                    await conn.send(data)
                except UpstreamClosed:
                    # A kept-alive connection the module closed as we reused it (its idle
                    # timeout raced our request) and not one byte of answer came back.
                    # An idempotent request goes once more on a new connection, as
                    # aiohttp and urllib3 do; any other is the module's error to report.
                    if conn.status or method not in IDEMPOTENT:
                        raise
                    timer.cancel()
                    conn = None
            if conn is None:
                conn = await self._connect(key, min(connect_timeout, deadline - loop.time()))
                timer = loop.call_at(deadline, conn.timed_out)
                await conn.send(data)
        except BaseException:
            if timer is not None:
                timer.cancel()
            if conn is not None:
                conn._abort()
            self._slots.release()
            raise
        assert timer is not None
        return Response(self, conn, method, timer)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn._abort()
        self._idle.clear()


#: Methods a request may be sent twice with (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BODYLESS_OK = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def _request_head(
    method: str, key: Origin, target: str, headers: list[tuple[str, str]], body: bytes | None
) -> bytes:
    lines = [f"{method} {key.base_path}{target} HTTP/1.1\r\n".encode("latin-1")]
    lines.append(b"Host: " + key.host_header + b"\r\n")
    for name, value in headers:
        if name.lower() != "content-length":  # always computed here, never duplicated
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if body is not None:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    elif method not in _BODYLESS_OK:
        lines.append(b"Content-Length: 0\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


_pools: dict[int, Pool] = {}


def pool(limit: int) -> Pool:
    """This event loop's pool (a new loop that reuses a dead one's id gets a new pool)."""
    loop = asyncio.get_running_loop()
    found = _pools.get(id(loop))
    if found is None or found.loop is not loop:
        found = _pools[id(loop)] = Pool(limit)
        found.loop = loop
    return found


def close_pool() -> None:
    found = _pools.pop(id(asyncio.get_running_loop()), None)
    if found is not None:
        found.close()


__all__ = [
    "ConnectFailed",
    "Connection",
    "Origin",
    "Pool",
    "Response",
    "UpstreamClosed",
    "UpstreamProtocolError",
    "close_pool",
    "origin",
    "pool",
]
