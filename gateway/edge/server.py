"""The HTTP/1.1 server protocol: uvicorn's httptools protocol with a public server's limits.

uvicorn's ``HttpToolsProtocol`` buffers a request head of any size (httptools joins the
pieces of a header value by concatenation: 64 MiB of one header costs seconds of CPU and
hundreds of MiB), has no deadline for a head that trickles in (slowloris), keeps a
connection that never sends a byte open forever, and has no cap on connections (its
``--limit-concurrency`` counts connections and tasks together and then answers 503 to
every request, on old connections too). :class:`GatewayHttpProtocol` adds what nginx has
(``large_client_header_buffers``, ``client_header_timeout``, ``keepalive_timeout``,
``worker_connections``, lingering close):

- a request head (request line and header block) over ``MAX_HEADER_BYTES`` bytes, or with
  more than ``MAX_HEADER_COUNT`` header fields, is answered 431 (problem+json, error
  ``invalid_request``) and the connection closed; nothing past the limit is handed to
  the parser, so no more than the limit is buffered. Every request on a kept-alive
  connection is counted afresh.
- request trailers (fields after a chunked body) are dropped, as nginx ignores them:
  uvicorn would append them to ``scope["headers"]`` while the request runs. In the body
  phase, bytes that bring no body byte (chunk framing, extensions, a trailer section) are
  bounded by the same ``MAX_HEADER_BYTES`` (plus the rest of one read): past it the
  connection is closed (httptools would buffer a trailer value without end).
- a head not complete ``VX11_CLIENT_HEADER_TIMEOUT`` seconds after its first byte, and a
  connection idle past ``--timeout-keep-alive`` (after a response, or since it was
  opened), is closed.
- past ``VX11_MAX_CONNECTIONS`` connections (HTTP and WebSocket) in a worker, a new
  connection is answered 503 ``service_overloaded`` and closed; connections already
  admitted, streams and WebSockets among them, are never refused.

One thing is for speed, not limits: :class:`HeadCork` holds a response head back until the
body's first bytes, so that a buffered answer leaves in one write (uvicorn writes the two
apart: two syscalls and two TCP segments per answer).

The deadlines need no timer per request: each connection holds a countdown of ticks
that one sweep per worker and event loop decrements (it replaces uvicorn's keep-alive
``call_later``, ≈3 µs per request with uvloop). The proxy path pays one integer add
per ``data_received``, one attribute test per header field and a few attribute stores
per request.

Selected with ``uvicorn --http gateway.edge.server:GatewayHttpProtocol`` (``server_command``).
It relies on uvicorn 0.54's internals (pinned in requirements.txt);
``tests/gateway/test_server_guard.py`` fails when an upgrade changes them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.core import correlation
from gateway.core.conf import gw
from gateway.core.problems import GatewayError, ServiceOverloaded
from gateway.edge.limits import MAX_HEADER_BYTES, MAX_HEADER_COUNT, HeadersTooLarge

log = logging.getLogger("gateway")

#: After a refusal the connection is half-closed (our FIN follows the answer) and what the
#: client still sends is read and dropped for this long, so that it reads the answer instead
#: of a reset (nginx's lingering close).
LINGER_SECONDS = 2.0


class _TooManyFields(Exception):
    """Raised in ``on_headers_complete`` to stop the parser; ``_feed`` turns it into 431."""


class Sweeper:
    """The deadlines of every guarded connection of one event loop, one tick at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keep_alive: float) -> None:
        head_timeout = gw.client_header_timeout
        self.loop = loop
        self.tick = max(0.05, min(1.0, head_timeout / 4, max(keep_alive, 0.2) / 4))
        self.head_ticks = self.ticks_for(head_timeout)
        self.idle_ticks = self.ticks_for(keep_alive)
        self.linger_ticks = self.ticks_for(LINGER_SECONDS)
        self.max_connections = gw.max_connections
        self.connections: set[GatewayHttpProtocol] = set()
        loop.call_later(self.tick, self.sweep)

    def ticks_for(self, seconds: float) -> int:
        """A countdown set between two ticks runs out ``seconds`` later at the earliest and
        two ticks after that at the latest."""
        return math.ceil(seconds / self.tick) + 1

    def sweep(self) -> None:
        expired = []
        for connection in self.connections:
            ticks = connection._ticks
            if ticks:
                connection._ticks = ticks = ticks - 1
                if not ticks:
                    expired.append(connection)
        for connection in expired:
            connection.deadline_passed()
        if not self.loop.is_closed():
            self.loop.call_later(self.tick, self.sweep)


_sweeper: Sweeper | None = None


def sweeper_for(loop: asyncio.AbstractEventLoop, config: Config) -> Sweeper:
    global _sweeper
    if _sweeper is None or _sweeper.loop is not loop:
        _sweeper = Sweeper(loop, float(config.timeout_keep_alive))
    return _sweeper


class HeadCork:
    """The transport as one request's response cycle sees it: the response head is held
    back until the body's first bytes, so that a buffered answer leaves in **one** write
    (uvicorn writes the head and the body apart: two ``send`` syscalls and two TCP segments
    per answer, for the gateway and for its client). A head whose body does not follow at
    once (a stream waiting for its module) is written at the loop's next pass."""

    __slots__ = ("_cycle", "_held", "_state", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._transport = transport
        self._cycle = cycle
        self._held: bytes | None = None
        self._state = 0  # 0: before the head, 1: head held, 2: head written

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._state = 2
            if len(data) < CORK_JOIN_BYTES:
                self._transport.write(held + data)
            else:  # no copy of a large body: one writev
                self._transport.writelines((held, data))
        elif self._state == 0 and self._cycle.response_started:  # not "100 Continue"
            self._held = data
            self._state = 1
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._state = 2
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


#: Below this, the held head and the body are joined into one bytes object (cheaper than
#: a vectored write of two); above it, they are written with ``writelines`` (no copy).
CORK_JOIN_BYTES = 64 * 1024


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head limits, head and idle deadlines, a cap."""

    # Per-connection state; class attributes are the initial values (no work per connection).
    _head_open = True  # reading a request head (or waiting for one)
    _head_bytes = 0  # bytes received since that head began
    _head_limit = MAX_HEADER_BYTES  # -1 once refused: every byte goes to the slow path
    _ticks = 0  # sweeps left before deadline_passed(); 0: no deadline
    _draining = False  # refused: what arrives is dropped until the linger ends
    _too_many_fields = False
    _stalled = 0  # body phase: bytes received since the last body byte (or the head's end)

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._sweeper = sweeper_for(self.loop, config)

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        sweeper = self._sweeper
        sweeper.connections.add(self)
        if len(self.connections) > sweeper.max_connections:
            self.refuse(ServiceOverloaded())
        else:
            self._ticks = sweeper.idle_ticks  # a connection that never sends a byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._sweeper.connections.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_open:
            if not self._head_bytes:
                self._ticks = self._sweeper.head_ticks
            self._head_bytes += len(data)
            if self._head_bytes > self._head_limit:
                self._past_limit(data)
                return
            self._feed(data)
            return
        self._stalled += len(data)
        self._feed(data)
        if self._stalled > MAX_HEADER_BYTES:  # on_body and on_message_complete reset it
            self.refuse(HeadersTooLarge())

    def _feed(self, data: bytes) -> None:
        # uvicorn's data_received, less its keep-alive timer (the sweep replaces it).
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._too_many_fields:
                self.refuse(HeadersTooLarge())
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _past_limit(self, data: bytes) -> None:
        """This chunk takes the head past its limit (or the connection was refused)."""
        if self._draining:
            return
        room = len(data) - (self._head_bytes - self._head_limit)
        self._feed(data[:room])
        if self._draining or self.transport.is_closing() or self.parser is None:
            return
        if self._head_open and self._head_bytes > self._head_limit:
            self.refuse(HeadersTooLarge())  # still no end of the head within the limit
            return
        if self.transport.get_protocol() is self:  # not upgraded to a WebSocket
            self.data_received(data[room:])  # the body, or a pipelined request's head

    # ------------------------------------------------------------------ parser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's, for the head only: a trailer field is dropped (nginx ignores them).
        if self._head_open:
            name = name.lower()
            if name == b"expect" and value.lower() == b"100-continue":
                self.expect_100_continue = True
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._ticks = 0
        if len(self.headers) > MAX_HEADER_COUNT:
            self._too_many_fields = True
            raise _TooManyFields
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # its task runs later
            cycle.transport = HeadCork(self.transport, cycle)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        # uvicorn's, and progress: the bytes without a body byte are counted from here.
        self._stalled = 0
        if (
            self.parser.should_upgrade() and self._should_upgrade()
        ) or self.cycle.response_complete:
            return
        self.cycle.body += body
        if len(self.cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        self.cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._head_open = True
        self._head_bytes = 0
        self._stalled = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # uvicorn's, with a countdown in place of its keep-alive call_later.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif not (self._head_open and self._head_bytes):  # no next request yet: idle from now
            self._ticks = self._sweeper.idle_ticks

    def handle_websocket_upgrade(self) -> None:
        self._sweeper.connections.discard(self)  # the WebSocket protocol owns it now
        self._ticks = 0
        super().handle_websocket_upgrade()

    # ------------------------------------------------------------------ limits

    def deadline_passed(self) -> None:
        """The head deadline, the keep-alive timeout or the linger after a refusal ran out."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if not self._draining and cycle is not None and not cycle.response_complete:
            self._ticks = self._sweeper.head_ticks  # a response is under way: look again later
            return
        if self._head_bytes and not self._draining:
            log.info("request head not complete in time; connection closed (%s)", self.client)
        self.transport.close()

    def refuse(self, error: GatewayError) -> None:
        """Answer ``error`` on this connection and close it; nothing more is parsed."""
        self._draining = True
        self._head_open = True
        self._head_limit = -1
        self._head_bytes = max(self._head_bytes, 1)  # keep the linger countdown below
        self._ticks = self._sweeper.linger_ticks
        self.pipeline.clear()
        transport = self.transport
        if transport.is_closing():
            return
        log.info("connection refused with %s %s (%s)", error.status, error.code, self.client)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            transport.close()  # an answer is being written: no room for another one
            return
        transport.write(self.problem_bytes(error))
        if transport.can_write_eof():
            transport.write_eof()
            self.flow.resume_reading()
        else:
            transport.close()

    def problem_bytes(self, error: GatewayError) -> bytes:
        cid = correlation.new_id()
        status, headers, body = error.render(cid)
        out = [f"HTTP/1.1 {status} {error.title}\r\n".encode("latin-1")]
        for name, value in self.server_state.default_headers:
            out += [name, b": ", value, b"\r\n"]
        out += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
        out.append(
            f"x-correlation-id: {cid}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n".encode("latin-1")
        )
        out.append(body)
        return b"".join(out)
