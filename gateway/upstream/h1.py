"""A lean HTTP/1.1 client for the proxy's upstream calls whose request body is in memory.

Why it exists: aiohttp's client was the largest single cost of a proxied request — ≈ 37 %
of the gateway's CPU samples, ≈ 90 µs per request (request object, URL handling, timer
and trace machinery, header multidicts, a StreamReader per response), more than the bare
reference proxy spends on everything else. A proxy needs much less: write the request
head and body in one ``write``, parse the answer with ``httptools`` (llhttp, in C — the
parser uvicorn uses), keep connections alive in a per-host pool, stream large answers with
flow control. ``python -m bench.clients`` measures it against aiohttp and httpx.

What it does, and what it leaves to aiohttp (``gateway.upstream.seam`` chooses):

- request bodies given as ``bytes`` (or none). A streamed request body (large, or
  chunked from the client) goes through aiohttp, which streams it with back-pressure;
- ``http`` and ``https`` (TLS verified against the system's trust store: ``gateway.upstream.tls``);
- answers sized by ``Content-Length``, chunked, or delimited by the connection's close;
  ``1xx`` interim answers skipped; ``204``, ``304`` and answers to ``HEAD`` end with their
  head whatever ``Content-Length`` says (an answer to ``HEAD`` never reuses the
  connection: llhttp cannot be told a bodiless answer is coming, so it is stopped at the
  head and where the head ended within the read is unknown);
- a hostile module is held to one exchange per answer (nginx's and httpcore's rules):
  the parser is fed only between the request and the end of its answer; any byte after
  that end (a second status line, a late unsolicited answer, in the same read or later,
  or waiting on an idle socket — checked with ``poll`` before reuse, as httpcore's
  ``has_expired`` does) closes the connection; a connection returns to the pool only at
  an exact message boundary. Refused with :class:`UpstreamProtocolError`: a status
  outside 100–599, a head over 64 KiB or 100 fields, a ``Transfer-Encoding`` other than
  exactly one ``chunked``, two ``Content-Length`` lines, both framings, broken chunks, a
  1xx with a body; trailer fields are dropped (``gateway.upstream.h1_head``);
- the request head is checked before a byte is sent (:class:`InvalidRequestHead`:
  CR/LF/NUL in the target or a value, a header name that is not a token);
- one deadline for the whole exchange (connect, head and body) — or for the head only
  (``head_only``: streaming routes, whose reader bounds the body, SPEC §20; a fallback option,
  whose body ``Response.bound`` bounds, SPEC §19) — and a separate
  connect timeout within it; the connection is aborted when the deadline passes or the
  caller gives up;
- a connection returns to the pool only after a complete answer that allows keep-alive;
  idle connections are dropped after ``idle_timeout`` seconds or when the module closes
  them;
- no redirects, no decompression, no headers added besides ``Host`` and ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import lru_cache
from urllib.parse import urlsplit

from gateway.core.conf import gw
from gateway.upstream import tls
from gateway.upstream.h1_conn import (
    HIGH_WATER,
    LOW_WATER,
    ConnectFailed,
    Connection,
    UpstreamClosed,
    UpstreamProtocolError,
)
from gateway.upstream.h1_head import InvalidRequestHead, Origin, request_head


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
        if self.method == "HEAD" or self.status == 204 or self.status == 304:
            return 0
        length = self.conn.length
        return length if length >= 0 else None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        if self.method == "HEAD":
            return
        while (chunk := await self.conn.next_chunk()) is not None:
            yield chunk

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body (``None``: its end); may be cancelled and called again."""
        if self.method == "HEAD":
            return None
        return await self.conn.next_chunk()

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

    def bound(self, timeout: float) -> None:
        """The rest of the answer within ``timeout`` seconds from now: the deadline of a
        ``head_only`` request's body (a fallback option chosen at its head, SPEC §19)."""
        if self._done:
            return
        self._timer.cancel()
        loop = self.conn.loop
        self._timer = loop.call_at(loop.time() + timeout, self.conn.timed_out)

    def release(self) -> None:
        """The body was read: the connection goes back to the pool if it can."""
        if self._done:
            return
        self._done = True
        self._timer.cancel()
        conn = self.conn
        if conn.complete and conn.error is None and conn.reusable:
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
        self._swept = time.monotonic()

    def put(self, conn: Connection) -> None:
        conn.head = None
        now = conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._slots.release()
        if now - self._swept > self.idle_timeout:
            self.sweep(now)

    def sweep(self, now: float) -> None:
        """Close every origin's connections idle past ``idle_timeout`` (at most once per
        ``idle_timeout``, from :meth:`put`): an origin no longer called — a target removed
        from its pool (SPEC §18) — would otherwise keep its sockets open."""
        self._swept = now
        cutoff = now - self.idle_timeout
        for key, idle in list(self._idle.items()):
            kept = [c for c in idle if c.idle_since >= cutoff]
            for conn in idle:
                if conn.idle_since < cutoff:
                    conn._abort()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    def forget(self) -> None:
        self._slots.release()

    def _take(self, key: Origin) -> Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        cutoff = time.monotonic() - self.idle_timeout
        while idle:
            conn = idle.pop()  # most recently used first: the warmest connection
            if conn.idle_since >= cutoff and conn.idle_ok():
                return conn
            conn._abort()
        return None

    async def _connect(self, key: Origin, timeout: float, deadline: float) -> Connection:
        """A new connection within ``timeout`` (``VX11_CONNECT_TIMEOUT``) and the request's
        ``deadline``: the connect bound passing first is a failed connect (503, may be
        retried, as Envoy's connect timeout), the deadline passing is a timeout."""
        loop = asyncio.get_running_loop()
        bound = min(timeout, deadline - loop.time())
        try:
            async with asyncio.timeout(bound):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, key),
                    key.host,
                    key.port,
                    ssl=tls.client_context() if key.scheme == "https" else None,
                    server_hostname=key.host if key.scheme == "https" else None,
                )
        except TimeoutError as exc:
            if bound < timeout:
                raise
            raise ConnectFailed(f"connect timed out after {timeout:g} s") from exc
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
        head_only: bool = False,
    ) -> Response:
        """Send one request and wait for the answer's head (the body is read later).

        ``timeout`` bounds the exchange (``head_only``: the head; its reader bounds the body).
        Raises ``TimeoutError`` (deadline), ``ConnectFailed`` (a connect over
        ``connect_timeout`` too), ``UpstreamClosed`` or ``UpstreamProtocolError``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        bodiless = method == "HEAD"
        data = request_head(method, key, target, headers, body)  # InvalidRequestHead
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
                    await conn.send(data, bodiless)
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
                conn = await self._connect(key, connect_timeout, deadline)
                timer = loop.call_at(deadline, conn.timed_out)
                await conn.send(data, bodiless)
        except BaseException:
            if timer is not None:
                timer.cancel()
            if conn is not None:
                conn._abort()
            self._slots.release()
            raise
        assert timer is not None
        if head_only:
            timer.cancel()  # the head is in: the deadline's work is done
        return Response(self, conn, method, timer)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn._abort()
        self._idle.clear()


#: Methods a request may be sent twice with (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


_pools: dict[int, Pool] = {}


def pool(limit: int | None = None) -> Pool:
    """This event loop's shared pool (a new loop that reuses a dead one's id gets a new pool).

    ``limit`` applies when the pool is created (default: ``VX11_UPSTREAM_POOL_SIZE``).
    """
    loop = asyncio.get_running_loop()
    found = _pools.get(id(loop))
    if found is None or found.loop is not loop:
        size = gw.upstream_pool_size if limit is None else limit
        found = _pools[id(loop)] = Pool(size)
        found.loop = loop
    return found


def close_pool() -> None:
    found = _pools.pop(id(asyncio.get_running_loop()), None)
    if found is not None:
        found.close()


__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "ConnectFailed",
    "Connection",
    "InvalidRequestHead",
    "Origin",
    "Pool",
    "Response",
    "UpstreamClosed",
    "UpstreamProtocolError",
    "close_pool",
    "origin",
    "pool",
    "request_head",
]
