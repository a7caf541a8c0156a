"""A pipelined Redis connection for the request path's script calls.

Why this exists instead of redis-py's asyncio client: every proxied request makes one or
two Lua script calls (rate limit, breaker admission). Through ``redis.asyncio`` each call
costs ≈100 µs of the gateway's CPU (connection-pool checkout and release, per-command
option handling, one socket write and one read per command), which on the benchmark
halved the gateway's throughput (``./run bench --redis``: 0.32× the bare proxy;
``python -m bench.redis_clients`` measures the two clients side by side).

This client keeps **one** connection per event loop and pipelines every call over it:
commands issued during one loop iteration leave in one ``write`` (flushed by a
``call_soon``), replies are parsed by ``hiredis`` (C) in ``data_received`` and handed to
the waiting callers in order. Redis answers in order, so no call ever waits for a free
connection, and a burst never opens a storm of connections (the reason ``gateway.state.store``
put a gate in front of redis-py's pool).

It does only what the hot path needs: ``EVALSHA`` with a transparent ``EVAL`` when the
server lost its script cache, plain commands, ``AUTH``/``SELECT`` from the URL, TLS for a
``rediss://`` URL with every ``ssl_*`` option redis-py honours (``gateway.state.redis_url``:
an option it cannot honour is refused, never dropped), reconnect on the next call after
the connection drops. Timeouts are the caller's
(``gateway.core.deadline.store_call``); a caller that gives up leaves its reply to be
discarded when it arrives. A connection that stops answering altogether is dropped once
its oldest unanswered command is older than ``stale_after`` seconds, so a store that hangs
(rather than refuses) does not keep callers queued behind a dead socket.

Errors are redis-py's exception classes (``ConnectionError``, ``TimeoutError``,
``ResponseError``), so callers handle both clients alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gateway.core.deadline import answered
from gateway.state.redis_url import check_url, connect_options

Arg = str | bytes | int | float


def encode(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings (hiredis's C encoder: ≈ 1.8 µs for an
    admission call's 23 arguments, against ≈ 6.4 µs in Python; floats as ``repr``)."""
    # hiredis's stub types the argument as a one-element tuple; any length is accepted.
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]
    return packed


def _no_script(exc: ResponseError) -> bool:
    """The server does not know the script (redis-py raises its own subclass for it)."""
    return isinstance(exc, NoScriptError) or str(exc).startswith("NOSCRIPT")


class Script:
    """A Lua script known by its SHA-1 (what ``EVALSHA`` needs)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's script id


class _Protocol(asyncio.Protocol):
    """Replies in order to the futures of the commands that were sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self.loop = loop
        self.clock = clock
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.lost: Exception | None = None
        self.pending: list[bytes] = []
        self.flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:  # garbage on the wire: the connection is done
                transport = self.transport
                self._fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                if transport is not None:
                    transport.abort()
                return
            if reply is False:
                return
            answered()
            if not waiters:  # an unsolicited reply: cannot be matched to anything
                continue
            future, _ = waiters.popleft()
            if future.done():  # its caller gave up (timeout, cancellation)
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Redis connection lost: {exc or 'closed by server'}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, error: Exception) -> None:
        self.lost = error
        self.transport = None
        while self.waiters:
            future, _ = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, data: bytes) -> asyncio.Future[Any]:
        if self.transport is None:
            raise self.lost or RedisConnectionError("Redis connection is not open")
        future = self.loop.create_future()
        self.waiters.append((future, self.clock()))
        self.pending.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and self.pending:
            self.transport.write(b"".join(self.pending))
        self.pending.clear()


class PipelinedRedis:
    """One pipelined connection to the server at ``url``, for one event loop."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 1.0,
        stale_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``stale_after``: seconds (on ``clock``) an unanswered command may wait before the
        connection is considered hung and replaced on the next call."""
        self.options, self._tls = connect_options(url)  # refuses what it cannot honour
        self._ssl: ssl.SSLContext | None = None
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.stale_after = stale_after
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        opts = self.options
        async with asyncio.timeout(self.connect_timeout):
            if opts.get("path"):
                _, protocol = await loop.create_unix_connection(
                    lambda: _Protocol(loop, self.clock), opts["path"]
                )
            else:
                tls = self._ssl_context()
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(loop, self.clock),
                    opts.get("host", "localhost"),
                    int(opts.get("port", 6379)),
                    ssl=tls,
                )
            handshake: list[asyncio.Future[Any]] = []
            if opts.get("password"):
                auth: list[Arg] = ["AUTH"]
                if opts.get("username"):
                    auth.append(opts["username"])
                auth.append(opts["password"])
                handshake.append(protocol.send(encode(auth)))
            if int(opts.get("db", 0) or 0):
                handshake.append(protocol.send(encode(["SELECT", int(opts["db"])])))
            try:
                for future in handshake:
                    await future
            except BaseException:
                if protocol.transport is not None:
                    protocol.transport.abort()
                raise
        return protocol

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The URL's TLS settings as redis-py's ``SSLConnection`` builds them (once)."""
        if self._tls is None:
            return None
        if self._ssl is None:
            self._ssl = self._tls.get()
        return self._ssl

    def _usable(self, protocol: _Protocol | None) -> bool:
        """Open, and not hung: its oldest unanswered command is younger than ``stale_after``."""
        if protocol is None or protocol.transport is None:
            return False
        waiters = protocol.waiters
        return not waiters or self.clock() - waiters[0][1] < self.stale_after

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()  # hung: drop it (its callers get ConnectionError)
        self._protocol = None
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            # shield: a caller timing out must not cancel the connect the others share
            protocol = await asyncio.shield(connecting)
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        self._protocol = protocol
        return protocol

    async def execute(self, *args: Arg) -> Any:
        """Send one command and wait for its reply."""
        protocol = self._protocol
        if not self._usable(protocol):
            protocol = await self._connection()
        assert protocol is not None
        return await protocol.send(encode(args))

    async def run_script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA``; if the server does not know the script (restart, flush), ``EVAL``."""
        protocol = self._protocol
        if not self._usable(protocol):
            protocol = await self._connection()
        assert protocol is not None
        try:
            # Sent from here rather than through ``execute``: one coroutine less per call.
            return await protocol.send(encode(("EVALSHA", script.sha, len(keys), *keys, *args)))
        except ResponseError as exc:
            if not _no_script(exc):
                raise
        return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            await protocol.closed


class RedisPyScripts:
    """The same ``run_script`` over a redis-py asyncio client (management code, tests)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def run_script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not _no_script(exc):
                raise
        return await self.client.eval(script.source, len(keys), *keys, *args)


#: What the Redis policy backends run their scripts through.
ScriptRunner = PipelinedRedis | RedisPyScripts


def script_runner(client: aioredis.Redis | ScriptRunner) -> ScriptRunner:
    """``client`` as a script runner (a redis-py client is wrapped)."""
    if isinstance(client, PipelinedRedis | RedisPyScripts):
        return client
    return RedisPyScripts(client)


__all__ = [
    "PipelinedRedis",
    "RedisPyScripts",
    "Script",
    "ScriptRunner",
    "check_url",
    "encode",
    "script_runner",
]
