"""The proxy's HTTP/1.1 upstream client (gateway/upstream/h1.py) against real TCP servers.

Each test starts a small server on a free loopback port that answers with exactly the
bytes the case needs (keep-alive, chunked, close-delimited, interim answers, garbage,
silence), so every branch meets a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway import upstream
from gateway.config.modules import ModuleInfo
from gateway.core.problems import BadGateway, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream import Body, OutboundRequest, UpstreamResponse, h1
from gateway.upstream.response import H1UpstreamResponse


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


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


@dataclass
class Server:
    handler: Handler
    requests: list[bytes] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)
    open_connections: int = 0
    most_open: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[1])
        self.open_connections += 1
        self.most_open = max(self.most_open, self.open_connections)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(handler: Handler) -> Server:
        server = await Server(handler).start()
        servers.append(server)
        return server

    yield start
    h1.close_pool()
    for server in servers:
        await server.close()


def keep_alive(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Handler:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while True:
            await s.read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + extra
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body
            )
            await writer.drain()

    return handler


def answers_once(raw: bytes, hold: float = 0.0) -> Handler:
    """Reads one request, writes ``raw`` (possibly nothing), keeps the connection ``hold`` s,
    then closes it."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await s.read_request(reader)
        if raw:
            writer.write(raw)
            await writer.drain()
        await asyncio.sleep(hold)

    return handler


async def fetch(
    server: Server,
    method: str = "GET",
    target: str = "/x",
    body: bytes | None = None,
    headers: list[tuple[str, str]] | None = None,
    timeout: float = 5.0,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    response = await send(method, server.url, target, headers or [], body, timeout)
    try:
        data = await response.read(10**8)
    except BaseException:
        response.close()
        raise
    response.release()
    return response.status, response.headers, data


async def test_a_connection_is_kept_alive_and_reused(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(keep_alive())
    for _ in range(3):
        status, _, body = await fetch(server)
        assert (status, body) == (200, b'{"ok":true}')
    assert len(server.peers) == 1  # three requests, one connection


async def test_the_request_head_is_exactly_what_the_proxy_decided(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(keep_alive())
    await fetch(
        server,
        "POST",
        "/a%2Fb?q=%20x",
        b'{"n":1}',
        [("Content-Type", "application/json"), ("content-length", "999"), ("X-Id", "7")],
    )
    await fetch(server, "POST", "/empty")
    await fetch(server, "GET", "/plain")
    first, empty, plain = server.requests
    lines = first.split(b"\r\n")
    assert lines[0] == b"POST /a%2Fb?q=%20x HTTP/1.1"  # byte for byte, nothing re-quoted
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"Content-Length: 7" in lines and b"content-length: 999" not in lines
    assert [line for line in lines if line.lower().startswith(b"content-length")] == [
        b"Content-Length: 7"
    ]
    assert b"X-Id: 7" in lines and first.endswith(b'\r\n\r\n{"n":1}')
    assert b"Content-Length: 0" in empty.split(b"\r\n")  # a POST without body says so
    assert b"content-length" not in plain.lower()  # a GET without body does not
    for request in server.requests:  # nothing added: no User-Agent, Accept, Connection
        assert b"user-agent" not in request.lower() and b"accept" not in request.lower()


async def test_a_module_base_path_prefixes_the_target(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(keep_alive())
    response = await send("GET", server.url + "/base/", "/x?y=1", [], None, 5.0)
    await response.read(100)
    response.release()
    assert server.requests[0].startswith(b"GET /base/x?y=1 HTTP/1.1\r\n")


async def test_a_chunked_answer_is_streamed_and_the_connection_reused(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while True:
            await s.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b"one,", b"two,", b"three"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")

    server = await serve(handler)
    response = await send("GET", server.url, "/s", [], None, 5.0)
    assert response.content_length() is None
    chunks = [chunk async for chunk in response.iter_chunks()]
    response.release()
    assert b"".join(chunks) == b"one,two,three" and len(chunks) >= 2
    assert (await fetch(server))[2] == b"one,two,three"
    assert len(server.peers) == 1


async def test_a_close_delimited_answer_ends_with_the_connection(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    server = await serve(handler)
    assert (await fetch(server))[2] == b"all of it"
    assert (await fetch(server))[2] == b"all of it"
    assert len(server.peers) == 2  # never reused after Connection: close


async def test_interim_answers_are_skipped(serve: Callable[..., Awaitable[Server]]) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while True:
            await s.read_request(reader)
            writer.write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
            )

    server = await serve(handler)
    status, headers, body = await fetch(server)
    assert (status, body) == (201, b"ok")
    assert all(name.lower() != b"link" for name, _ in headers)
    assert (await fetch(server))[0] == 201  # the connection was left in a clean state


async def test_head_answers_have_no_body_and_do_not_reuse_the_connection(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(keep_alive(body=b"x" * 50))
    response = await send("HEAD", server.url, "/h", [], None, 5.0)
    assert response.header("content-length") == "50"
    assert response.content_length() == 0
    assert await response.read_sized() == b""
    response.release()
    assert (await fetch(server))[2] == b"x" * 50
    assert len(server.peers) == 2


async def test_an_answer_cut_short_is_a_502(serve: Callable[..., Awaitable[Server]]) -> None:
    server = await serve(answers_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"))
    response = await send("GET", server.url, "/x", [], None, 5.0)
    with pytest.raises(BadGateway, match="broke off"):
        await response.read_sized()
    response.close()


async def test_garbage_instead_of_http_is_a_502(serve: Callable[..., Awaitable[Server]]) -> None:
    server = await serve(answers_once(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", hold=1))
    with pytest.raises(BadGateway, match="no valid answer"):
        await fetch(server)


async def test_a_module_that_closes_without_answering_is_a_502(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(answers_once(b""))
    with pytest.raises(BadGateway, match="closed the connection"):
        await fetch(server)


async def test_a_silent_module_times_out_at_the_deadline(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(answers_once(b"", hold=5))
    with pytest.raises(UpstreamTimeout, match=r"within 0\.2 s"):
        await fetch(server, timeout=0.2)


async def test_a_body_that_stalls_times_out_mid_answer(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(answers_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", hold=5))
    response = await send("GET", server.url, "/x", [], None, 0.3)
    with pytest.raises(UpstreamTimeout, match="did not finish"):
        await response.read_sized()
    response.close()


async def test_no_listener_is_unavailable(serve: Callable[..., Awaitable[Server]]) -> None:
    server = await serve(keep_alive())
    await server.close()
    assert server.server is not None
    await server.server.wait_closed()
    with pytest.raises(UpstreamUnavailable, match="Cannot connect"):
        await fetch(server)


async def test_tls_is_verified_for_https_modules(serve: Callable[..., Awaitable[Server]]) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")  # not TLS
        await writer.drain()

    server = await serve(plain)
    with pytest.raises(UpstreamUnavailable, match="Cannot connect"):
        await send("GET", f"https://127.0.0.1:{server.port}", "/x", [], None, 2.0)


async def test_an_idle_connection_the_module_closed_is_not_reused(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # keep-alive answered, then the module's idle timeout closes the connection

    server = await serve(handler)
    assert (await fetch(server))[2] == b"ok"
    for _ in range(50):  # until the close has reached the client side
        await asyncio.sleep(0.01)
        if server.open_connections == 0:
            break
    await asyncio.sleep(0.05)
    assert (await fetch(server))[2] == b"ok"
    assert len(server.peers) == 2


async def test_the_pool_limit_bounds_open_connections(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while True:
            await s.read_request(reader)
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await serve(handler)
    pool = h1.Pool(limit=2)
    key = h1.origin(server.url)

    async def one() -> bytes:
        response = await pool.request("GET", key, "/x", [], None, 5.0, 5.0)
        body = await response.read()
        response.release()
        return body

    assert await asyncio.gather(*(one() for _ in range(8))) == [b"ok"] * 8
    assert server.most_open == 2
    pool.close()


async def test_a_large_answer_pauses_the_module_until_it_is_read(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    size = 8 * 1024 * 1024

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"z" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    server = await serve(handler)
    response = await send("GET", server.url, "/big", [], None, 10.0)
    await asyncio.sleep(0.3)  # the module writes as fast as it can; nobody reads
    assert isinstance(response, H1UpstreamResponse)
    conn = response._response.conn
    assert conn.paused
    assert conn.body_size < h1.HIGH_WATER + 2 * 1024 * 1024  # buffered: bounded, not 8 MiB
    total = 0
    async for chunk in response.iter_chunks():
        total += len(chunk)
    response.release()
    assert total == size


def test_module_urls_are_split_once_with_default_ports() -> None:
    assert h1.origin("http://mod.example") == h1.Origin(
        "http", "mod.example", 80, "", b"mod.example"
    )
    assert h1.origin("https://[::1]:8443/api/") == h1.Origin(
        "https", "::1", 8443, "/api", b"[::1]:8443"
    )
    with pytest.raises(ValueError, match="not an http"):
        h1.origin("ftp://x")


def closes_the_reused_connection() -> Handler:
    """Answers the first request of the first connection, then closes that connection
    when the second request arrives on it (a keep-alive timeout racing the reuse)."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        first_connection = len(s.peers) == 1
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if first_connection:
            await s.read_request(reader)
            return  # closed without an answer
        while True:
            await s.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    return handler


async def test_an_idempotent_request_on_a_connection_closed_under_it_is_sent_again(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(closes_the_reused_connection())
    assert (await fetch(server))[2] == b"ok"
    assert (await fetch(server, "PUT", body=b"v"))[2] == b"ok"  # resent on a new connection
    assert len(server.peers) == 2 and len(server.requests) == 3


async def test_a_post_on_a_connection_closed_under_it_is_not_sent_again(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(closes_the_reused_connection())
    assert (await fetch(server))[2] == b"ok"
    with pytest.raises(BadGateway, match="closed the connection"):
        await fetch(server, "POST", body=b"once")
    assert len(server.peers) == 1  # the module may have acted on it: never resent


async def test_waiting_for_a_pooled_connection_ends_at_the_deadline(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await s.read_request(reader)
        await asyncio.sleep(2)

    server = await serve(handler)
    pool = h1.Pool(limit=1)
    key = h1.origin(server.url)
    busy = asyncio.ensure_future(pool.request("GET", key, "/slow", [], None, 5.0, 5.0))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await pool.request("GET", key, "/waits", [], None, 0.2, 0.2)
    assert len(server.requests) == 1  # the second request never got a connection
    busy.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await busy
    pool.close()
