"""One connection to a module for ``gateway.upstream.h1``: the asyncio protocol and llhttp callbacks.

The parser is fed only while an exchange is open and its answer is not complete; what
a hostile module can send beyond that is closed, never parsed (``gateway.upstream.h1``'s
docstring lists the rules, ``gateway.upstream.h1_head`` the framing checks).
"""

from __future__ import annotations

import asyncio
import select
from collections import deque
from typing import NoReturn, cast

import httptools

from gateway.upstream.h1_head import (
    FRAMING_NAME_SIZES,
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    UNSIZED,
    Origin,
    framing,
    head_size,
)

#: A streamed answer pauses reading from the module above this many buffered bytes.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class UpstreamClosed(ConnectionError):
    """The module closed the connection before its answer was complete."""


class UpstreamProtocolError(ConnectionError):
    """The module's answer is not valid HTTP/1.1."""


class ConnectFailed(OSError):
    """No connection to the module (refused, unreachable, DNS, TLS handshake)."""


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp where it is (the reason is kept)."""


class Connection(asyncio.Protocol):
    """One connection to a module; one exchange at a time.

    The parser is fed only while an exchange is open and its answer is not complete: a
    byte the module sends while idle, after the end of the answer (a second status line,
    a late body), or past a head that ends a bodiless answer closes the connection, so
    nothing is ever parsed into the next exchange (the rules: ``gateway.upstream.h1``'s docstring).
    """

    __slots__ = (
        "bodiless",
        "body",
        "body_size",
        "complete",
        "error",
        "head",
        "headers",
        "idle_since",
        "interim",
        "interim_bytes",
        "key",
        "length",
        "loop",
        "parser",
        "paused",
        "pending",
        "poller",
        "refusal",
        "reusable",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Origin) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.poller: select.poll | None = None
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
        self.bodiless = False
        self.length = UNSIZED  # Content-Length, CHUNKED or UNSIZED (gateway.upstream.h1_head)
        self.refusal: str | None = None  # why the head's framing is refused
        self.pending = 0  # bytes read without progress (see data_received)
        self.interim = 0  # fields of skipped 1xx heads ...
        self.interim_bytes = 0  # ... and their size

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    def data_received(self, data: bytes) -> None:
        if self.head is None or self.complete:
            # Idle, or after the end of the answer: a module must not speak unasked.
            self.reusable = False
            self._abort()
            return
        buffered = self.body_size  # grows only through on_body, during the feed
        status = self.status
        self.pending += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not self.complete:  # a callback refused the answer (self.error is set)
                self._fail(UpstreamProtocolError("invalid answer"))
            self.reusable = False  # the end was reached: whatever followed is dropped
            self._abort()
            return
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("the module switched protocols"))
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid answer: {exc}"))
            return
        if self.body_size != buffered or self.status != status or self.complete:
            self.pending = 0  # progress: a body byte, the head, the end
        elif self.pending > MAX_HEAD_BYTES:  # reads without progress: a head, chunk sizes
            # and extensions, or trailers that do not end (a read's rest after progress
            # is not counted: a bound of one read, 256 KiB, more)
            what = "answer head" if self.status == 0 else "chunk framing or trailer section"
            self._fail(UpstreamProtocolError(f"the {what} exceeds {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if self.complete or self.error is not None:
            self._wake()
            return
        if self.head is None:
            return  # idle connection closed by the module: the pool drops it
        if self.status and self.length == UNSIZED and exc is None:
            self.complete = True  # a close-delimited body ends with the connection's FIN
            self._wake()
            return
        self._fail(
            UpstreamClosed(f"the module closed the connection{': ' + str(exc) if exc else ''}")
        )

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # a second message after the answer's end: never parsed
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status == 0:  # trailer fields (after the head) are dropped, as nginx does
            self.headers.append((name, value))
            if len(name) in FRAMING_NAME_SIZES:
                found = framing(self.length, name, value)
                if type(found) is str:
                    self.refusal = self.refusal or found
                else:
                    self.length = found  # type: ignore[assignment]  # a str is kept above

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers = self.headers
        if len(headers) + self.interim > MAX_FIELDS:
            self._refuse(f"the answer head has more than {MAX_FIELDS} fields")
        if (
            self.pending > MAX_HEAD_BYTES  # only then can the heads be too large
            and head_size(headers) + self.interim_bytes > MAX_HEAD_BYTES
        ):
            self._refuse(f"the answer head exceeds {MAX_HEAD_BYTES} bytes")
        if self.refusal is not None:
            self._refuse(self.refusal)
        if status < 200:
            if status < 100:
                self._refuse(f"status {status} is not an HTTP status")
            if self.length != UNSIZED:  # llhttp would read a body after a 1xx; h11 would not
                self._refuse(f"an interim {status} answer with a body")
            # interim answer (100 Continue, 103 Early Hints): skip it
            self.interim += len(headers)
            self.interim_bytes += head_size(headers)
            self.headers = []
            return
        if status > 599:
            self._refuse(f"status {status} is not an HTTP status")
        self.status = status
        if not self.parser.should_keep_alive():
            self.reusable = False
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
        if self.bodiless and status != 204 and status != 304:
            # The answer to HEAD ends with its head whatever Content-Length says; llhttp
            # cannot be told, so it is stopped here, and the connection is not reused
            # (where the head ended within this read is unknown).
            self.complete = True
            self.reusable = False
            self._wake()
            raise _Stop

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

    def _refuse(self, reason: str) -> NoReturn:
        """Fail the exchange from inside a parser callback and stop the parser."""
        self._fail(UpstreamProtocolError(f"invalid answer: {reason}"))
        raise _Stop

    def idle_ok(self) -> bool:
        """Still usable after a rest in the pool: open, and nothing to read (httpcore's
        ``has_expired``: a readable idle socket has either been closed by the module or
        carries bytes nobody asked for; data_received may not have run yet)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        poller = self.poller
        return poller is None or not poller.poll(0)

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

    def send(self, data: bytes, bodiless: bool = False) -> asyncio.Future[None]:
        transport = self.transport
        if transport is None:  # the module spoke before our request (data_received closed)
            raise UpstreamClosed("the module closed the connection or spoke unasked")
        self._reset()
        self.bodiless = bodiless
        self.head = self.loop.create_future()
        transport.write(data)
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


__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "ConnectFailed",
    "Connection",
    "UpstreamClosed",
    "UpstreamProtocolError",
]
