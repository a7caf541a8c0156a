"""``gateway.upstream.h1`` against a hostile module: raw TCP servers that send exactly the bytes an
attacker controlling a module would (issue #12, items 1, 7 and 8).

A module must never reach beyond its own exchange: bytes after a complete answer (a second
status line, a late unsolicited answer) are never parsed into that answer nor into the next
request's, a pooled connection is reused only at an exact message boundary, and framing the
gateway cannot read unambiguously is refused instead of guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvloop

from gateway import upstream
from gateway.config.modules import ModuleInfo
from gateway.core.problems import BadGateway, InvalidRequest
from gateway.upstream import Body, OutboundRequest, UpstreamResponse, h1
from tests.conftest import OPERATOR_TOKEN, GwEnv, LiveGateway


async def send(
    method: str,
    base_url: str,
    target: str,
    headers: list[tuple[str, str]],
    body: Body,
    timeout: float,
) -> UpstreamResponse:
    """One request through the seam (``gateway.upstream.send``) to a module at ``base_url``."""
    return await upstream.send(
        ModuleInfo("test", base_url), OutboundRequest(method, target, headers, body, timeout)
    )


EVIL = (
    b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/\r\nContent-Length: 4\r\n"
    b"Set-Cookie: sessionid=stolen\r\n\r\nevil"
)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


#: Writes the answer(s) to the ``n``-th request (1-based, all connections) of connection
#: ``conn`` (1-based): a list of writes, each (bytes, delay before it); ``CLOSE`` closes.
CLOSE = b""
Script = Callable[[int, int], list[tuple[bytes, float]]]


@dataclass
class Raw:
    """An asyncio server on its own thread and loop (so its writes land in the socket
    while the test's loop is blocked)."""

    script: Script
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    received: int = 0  # bytes received on any connection
    loop: asyncio.AbstractEventLoop | None = None
    stopped: asyncio.Future[None] | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    thread: threading.Thread | None = None
    port: int = 0

    def start(self) -> Raw:
        ready = threading.Event()

        async def run() -> None:
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self.loop = asyncio.get_running_loop()
            self.stopped = self.loop.create_future()
            ready.set()
            await self.stopped
            server.close()
            for writer in self.writers:
                writer.transport.abort()
            await server.wait_closed()

        self.thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
        self.thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        if self.loop is not None and self.stopped is not None:
            self.loop.call_soon_threadsafe(self.stopped.set_result, None)
        if self.thread is not None:
            self.thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        conn = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.received += len(head)
                self.requests.append(head)
                if b"\r\ntransfer-encoding: chunked\r\n" in head.lower():
                    await reader.readuntil(b"\r\n0\r\n\r\n")  # the tests' bodies: simple
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":", 1)[1]))
                for data, delay in self.script(conn, len(self.requests)):
                    if delay:
                        await asyncio.sleep(delay)
                    if data == CLOSE:
                        return
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Script], Awaitable[Raw]]]:
    servers: list[Raw] = []

    async def start(script: Script) -> Raw:
        server = Raw(script).start()
        servers.append(server)
        return server

    yield start
    await upstream.close()  # this loop's h1 pool and aiohttp session
    for server in servers:
        server.stop()


async def get(
    server: Raw,
    method: str = "GET",
    target: str = "/x",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    linger: float = 0.0,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One exchange through ``send``; ``linger``: the caller holds the finished
    answer that long (writing it out to a slow client) before releasing it."""
    response = await send(method, server.url, target, headers or [], body, 5.0)
    try:
        data = await response.read(10**7)
        if linger:
            await asyncio.sleep(linger)
    except BaseException:
        response.close()
        raise
    response.release()
    return response.status, response.headers, data


async def streamed(*parts: bytes) -> AsyncIterator[bytes]:
    """A request body aiohttp sends chunked (the streamed path)."""
    for part in parts:
        yield part


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name.lower() for name, _ in headers]


# --------------------------------------------------------------------------- item 1


async def test_a_second_answer_in_the_same_write_never_reaches_anyone(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    server = await raw(lambda conn, n: [(ok(b"first") + EVIL, 0)] if n == 1 else [(ok(b"x"), 0)])
    status, headers, body = await get(server)
    assert (status, body) == (200, b"first")
    assert names(headers) == [b"content-length"]  # nothing of the 302 merged in
    status, headers, body = await get(server)
    assert (status, body) == (200, b"x")  # its own fresh answer, not the 302's
    assert server.connections == 2  # the poisoned connection was closed


async def test_a_second_answer_arriving_later_never_reaches_anyone(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    def script(conn: int, n: int) -> list[tuple[bytes, float]]:
        if n == 1:
            return [(ok(b"first"), 0), (EVIL, 0.05)]
        return [(ok(b"x"), 0)]

    server = await raw(script)
    status, headers, body = await get(server, linger=0.2)  # the 302 comes meanwhile
    assert (status, body, names(headers)) == (200, b"first", [b"content-length"])
    assert await get(server) == (200, [(b"Content-Length", b"1")], b"x")
    assert server.connections == 2


async def test_an_unsolicited_answer_waiting_on_an_idle_connection_is_not_taken(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    """The late answer is in the socket's buffer but the event loop has not run
    ``data_received`` yet (a busy loop): the pool's readability check catches it."""

    def script(conn: int, n: int) -> list[tuple[bytes, float]]:
        if n == 1:
            return [(ok(b"first"), 0), (ok(b"injected"), 0.05)]
        return [(ok(b"fresh"), 0)]

    server = await raw(script)
    assert (await get(server))[2] == b"first"
    await asyncio.sleep(0.01)  # let the server task reach its delayed write ...
    time.sleep(0.2)  # ... and block the loop: the bytes arrive, no callback runs
    assert (await get(server))[2] == b"fresh"
    assert server.connections == 2


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_a_bodiless_answer_with_content_length_keeps_the_connection(
    raw: Callable[[Script], Awaitable[Raw]], status: bytes
) -> None:
    server = await raw(
        lambda conn, n: (
            [(b"HTTP/1.1 " + status + b"\r\nContent-Length: 42\r\n\r\n", 0)]
            if n % 2
            else [(ok(b"next"), 0)]
        )
    )
    for _ in range(2):
        response = await send("GET", server.url, "/x", [], None, 5.0)
        assert response.content_length() == 0
        assert await response.read_sized() == b""
        response.release()
        assert (await get(server))[2] == b"next"  # not 42 bytes of it taken as a body
    assert server.connections == 1


async def test_a_bodiless_answer_followed_by_an_answer_closes_the_connection(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    server = await raw(
        lambda conn, n: (
            [(b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n" + EVIL, 0)]
            if n == 1
            else [(ok(b"fresh"), 0)]
        )
    )
    status, headers, body = await get(server)
    assert (status, body, names(headers)) == (204, b"", [b"content-length"])
    assert (await get(server))[2] == b"fresh"
    assert server.connections == 2


async def test_an_answer_to_head_ends_with_its_head(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    server = await raw(
        lambda conn, n: (
            [(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n" + EVIL, 0)]
            if n == 1
            else [(ok(b"fresh"), 0)]
        )
    )
    status, headers, body = await get(server, "HEAD")
    assert (status, body, names(headers)) == (200, b"", [b"content-length"])
    assert (await get(server))[2] == b"fresh"
    assert server.connections == 2


async def test_trailer_fields_never_join_the_head(raw: Callable[[Script], Awaitable[Raw]]) -> None:
    server = await raw(
        lambda conn, n: [
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nok\r\n0\r\nLocation: https://evil.example/\r\n\r\n",
                0,
            )
        ]
    )
    status, headers, body = await get(server)
    assert (status, body, names(headers)) == (200, b"ok", [b"transfer-encoding"])
    assert (await get(server))[2] == b"ok"
    assert server.connections == 1  # a clean message boundary: reused


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "Duplicate"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", "Duplicate"),
        (b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok", "status 600"),
        (b"HTTP/1.1 099 Below\r\nContent-Length: 2\r\n\r\nok", "status 99"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 70000 + b"\r\n\r\n", "exceeds 65536"),
        (
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
            "more than 100 fields",
        ),
        (
            b"HTTP/1.1 199 Odd\r\nContent-Length: 5\r\n\r\nHTTP/1"
            b".1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "interim 199 answer with a body",
        ),
    ],
)
async def test_an_ambiguous_or_oversized_head_is_a_502(
    raw: Callable[[Script], Awaitable[Raw]], answer: bytes, reason: str
) -> None:
    server = await raw(lambda conn, n: [(answer, 0)])
    with pytest.raises(BadGateway, match=reason):
        await get(server)


async def test_a_head_trickled_past_the_limit_is_a_502(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    """The limit holds before the head is complete (memory is bounded, not just checked)."""
    line = b"X-Pad: " + b"p" * 1000 + b"\r\n"
    server = await raw(
        lambda conn, n: [(b"HTTP/1.1 200 OK\r\n", 0)] + [(line, 0.001) for _ in range(200)]
    )
    with pytest.raises(BadGateway, match="head exceeds 65536"):
        await get(server)


async def test_many_small_fields_within_the_limits_pass(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    extra = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 600) for i in range(99))
    server = await raw(lambda conn, n: [(ok(b"ok", extra), 0)])
    status, headers, body = await get(server)
    assert (status, len(headers), body) == (200, 100, b"ok")


# --------------------------------------------------------------------------- request heads


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/x\r\nX-Injected: 1", []),
        ("/x HTTP/1.1\r\n\r\nGET /admin", []),
        ("/x\x00y", []),
        ("/x", [("X-A", "v\r\nX-Injected: 1")]),
        ("/x", [("X-A", "v\nX-Injected: 1")]),
        ("/x", [("X-A", "v\rX")]),
        ("/x", [("X-A", "v\x00")]),
        ("/x", [("X A", "v")]),
        ("/x", [("X-A:", "v")]),
        ("/x", [("X-A\r\nX-Injected", "v")]),
        ("/x", [("", "v")]),
        ("/x", [("X-\u2603", "v")]),
        ("/x", [("X-A", "\u2603")]),
    ],
)
async def test_a_request_head_that_cannot_be_written_is_refused_before_a_byte_is_sent(
    raw: Callable[[Script], Awaitable[Raw]], target: str, headers: list[tuple[str, str]]
) -> None:
    server = await raw(lambda conn, n: [(ok(b"x"), 0)])
    pool = h1.Pool(limit=4)
    with pytest.raises(h1.InvalidRequestHead):
        await pool.request("GET", h1.origin(server.url), target, headers, None, 5.0, 5.0)
    pool.close()
    with pytest.raises(InvalidRequest, match="cannot be forwarded"):
        await send("POST", server.url, target, headers, b"{}", 5.0)

    async def streamed() -> AsyncIterator[bytes]:
        yield b"{}"

    with pytest.raises(InvalidRequest, match="cannot be forwarded"):  # the aiohttp path
        await send("POST", server.url, target, headers, streamed(), 5.0)
    await asyncio.sleep(0.05)
    assert (server.connections, server.received) == (0, 0)


async def test_valid_request_heads_still_pass(raw: Callable[[Script], Awaitable[Raw]]) -> None:
    server = await raw(lambda conn, n: [(ok(b"x"), 0)])
    headers = [("X-Odd!#$%&'*+-.^_`|~", "tab\tand obs-text \xe9"), ("Accept", "")]
    assert (await get(server, target="/a%20b?q=%0D%0A&x=~", headers=headers))[2] == b"x"
    assert server.requests[0].startswith(b"GET /a%20b?q=%0D%0A&x=~ HTTP/1.1\r\n")
    assert b"\r\nX-Odd!#$%&'*+-.^_`|~: tab\tand obs-text \xe9\r\n" in server.requests[0]


# --------------------------------------------------------------------------- items 7 and 8


async def test_a_status_outside_100_599_is_a_502_on_the_streamed_path_too(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    server = await raw(lambda conn, n: [(b"HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n", 0)])

    async def streamed() -> AsyncIterator[bytes]:
        yield b"{}"

    with pytest.raises(BadGateway, match="status 600"):
        await send("POST", server.url, "/x", [], streamed(), 5.0)


@pytest.mark.parametrize(
    "coding",
    [
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: identity\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 7\r\n",
        b"Transfer-Encoding: chunked,\r\n",
    ],
)
async def test_a_transfer_coding_other_than_chunked_is_a_502(
    raw: Callable[[Script], Awaitable[Raw]], coding: bytes
) -> None:
    server = await raw(
        lambda conn, n: [(b"HTTP/1.1 200 OK\r\n" + coding + b"\r\n2\r\nok\r\n0\r\n\r\n", 0)]
    )
    with pytest.raises(BadGateway):
        await get(server)


async def test_a_transfer_coding_other_than_chunked_is_a_502_on_the_streamed_path_too(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    codings = [
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked,\r\n",
    ]
    server = await raw(
        lambda conn, n: [(b"HTTP/1.1 200 OK\r\n" + codings[n - 1] + b"\r\n2\r\nok\r\n0\r\n\r\n", 0)]
    )
    for _ in codings:
        with pytest.raises(BadGateway, match="Transfer-Encoding"):
            await send("POST", server.url, "/x", [], streamed(b"{}"), 5.0)
    assert len(server.requests) == len(codings)


@pytest.mark.parametrize(
    ("body", "then"),
    [
        (b"2\r\nokXX0\r\n\r\n", b"."),  # no CRLF after the chunk's data
        (b"zz\r\nok\r\n0\r\n\r\n", b"."),  # not a hex size
        (b"ffffffffffffffffff\r\nok\r\n0\r\n\r\n", b"."),  # size overflow
        (b"2\r\nok\r\n", CLOSE),  # cut short: no last chunk
        (b"5\r\nok", CLOSE),  # cut short inside a chunk
        (b"2\r\nok\r\n0\r\nX-T: ", b"t" * 70000),  # an endless trailer section
        (b"2;", b"e" * 70000),  # an endless chunk extension
    ],
)
async def test_broken_or_cut_chunked_bodies_fail_in_the_body_and_are_not_reused(
    raw: Callable[[Script], Awaitable[Raw]], body: bytes, then: bytes
) -> None:
    server = await raw(
        lambda conn, n: (
            [
                (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0),
                (body, 0),
                (then, 0.05),  # closes, or more of the same (never ends by itself)
            ]
            if n == 1
            else [(ok(b"fresh"), 0)]
        )
    )
    response = await send("GET", server.url, "/x", [], None, 5.0)
    assert response.status == 200
    with pytest.raises(BadGateway, match="broke off"):
        async for _ in response.iter_chunks():
            pass
    response.close()
    assert (await get(server))[2] == b"fresh"
    assert server.connections == 2


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def poisoning_module() -> Iterator[tuple[str, list[int]]]:
    """A module that follows its first answer with an injected 302 in the same write,
    and gives every later request its own answer; counts its connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = threading.Event()
    seen = [0, 0]  # connections, requests

    def one(conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while not stop.is_set():
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                seen[1] += 1
                if seen[1] == 1:
                    conn.sendall(ok(b'{"n":1}', b"Content-Type: application/json\r\n") + EVIL)
                else:
                    conn.sendall(ok(b'{"n":%d}' % seen[1], b"Content-Type: application/json\r\n"))

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            seen[0] += 1
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", seen
    stop.set()
    thread.join(2)
    sock.close()


def test_a_gateway_client_never_receives_an_answer_injected_by_a_module(
    gateway: LiveGateway, gw_env: GwEnv, poisoning_module: tuple[str, list[int]]
) -> None:
    url, seen = poisoning_module
    gw_env.set(VX11_MODULE_SWITCH_URL=url)
    base = gateway.url
    headers = {"X-VX11-Token": OPERATOR_TOKEN}
    answers = []
    for _ in range(2):  # two clients, one after the other
        with httpx.Client(base_url=base, timeout=10) as client:
            answers.append(client.post("/vx11/route/task", json={}, headers=headers))
    assert [(r.status_code, r.json()) for r in answers] == [(200, {"n": 1}), (200, {"n": 2})]
    for r in answers:
        assert "location" not in r.headers and "set-cookie" not in r.headers
        assert r.headers.get_list("content-length") == [str(len(r.content))]
    assert seen == [2, 2]  # the poisoned connection was not reused


# --------------------------------------------------------------------------- review of #12


@contextlib.contextmanager
def socket_module(serve: Callable[[socket.socket], None]) -> Iterator[str]:
    """A module on raw blocking sockets: ``serve(conn)`` runs for each connection, on its
    own thread (the connection is closed when it returns, unless it closed it itself)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            serve(conn)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.settimeout(5)
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        sock.close()


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            break
        data += more
    return data


def reset(conn: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.mark.parametrize("cut", ["reset", "fin"])
async def test_a_close_delimited_answer_cut_by_a_reset_is_not_complete(cut: str) -> None:
    """No Content-Length, not chunked: the body ends with the connection's FIN; a reset
    means it was cut, and a cut answer must not reach the client as a whole one."""

    def serve(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
        time.sleep(0.1)  # the head and the bytes are read first
        if cut == "reset":
            reset(conn)

    with socket_module(serve) as url:
        try:
            response = await send("GET", url, "/x", [], None, 5.0)
            assert (response.status, response.content_length()) == (200, None)
            received = []
            if cut == "fin":
                async for chunk in response.iter_chunks():
                    received.append(chunk)
                assert b"".join(received) == b"partial"
                response.release()
            else:
                with pytest.raises(BadGateway, match="broke off: UpstreamClosed"):
                    async for chunk in response.iter_chunks():
                        received.append(chunk)
                response.close()
                assert b"".join(received) in (b"", b"partial")
        finally:
            await upstream.close()


def test_a_module_that_speaks_before_the_request_is_a_502_not_a_crash() -> None:
    """A banner right on accept: with uvloop (as in production) it can be read between the
    connect and the request's write; the exchange fails as the module's error (502, the
    breaker records it), never with an AssertionError (a 500 and a leaked permit)."""

    def serve(conn: socket.socket) -> None:
        conn.sendall(b"220 smtp.example ESMTP ready\r\n")
        time.sleep(1.0)

    async def main(url: str) -> list[str]:
        loop = asyncio.get_running_loop()
        handle: asyncio.Handle | None = None

        def busy() -> None:  # a loaded loop: the banner is in the socket at each poll
            nonlocal handle
            time.sleep(0.01)
            handle = loop.call_soon(busy)

        busy()
        outcomes = []
        try:
            for method, body in (("GET", None), ("POST", b"{}"), ("GET", None)):
                with pytest.raises(BadGateway, match="no valid answer") as caught:
                    await send(method, url, "/x", [], body, 5.0)
                outcomes.append(str(caught.value.__cause__))
        finally:
            assert handle is not None
            handle.cancel()
            await upstream.close()
        return outcomes

    with socket_module(serve) as url:
        outcomes = asyncio.run(main(url), loop_factory=uvloop.new_event_loop)
    assert len(outcomes) == 3


async def test_an_unsolicited_answer_on_an_idle_streamed_path_connection_is_never_taken(
    raw: Callable[[Script], Awaitable[Raw]],
) -> None:
    """aiohttp (streamed request bodies) would parse a 302 sent on its idle keep-alive
    connection and hand it to the next upload on that connection."""

    def script(conn: int, n: int) -> list[tuple[bytes, float]]:
        if n == 1:
            return [(ok(b"first"), 0), (EVIL, 0.05)]
        return [(ok(b"own %d" % n), 0)]

    server = await raw(script)
    answers = []
    for _ in range(3):
        response = await send("POST", server.url, "/x", [], streamed(b"up", b"load"), 5)
        answers.append((response.status, await response.read(1000)))
        response.release()
        await asyncio.sleep(0.2)  # the 302 arrives on the idle connection meanwhile
    assert answers == [(200, b"first"), (200, b"own 2"), (200, b"own 3")]
    assert server.connections == 3  # one connection per upload
