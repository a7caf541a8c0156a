"""The response head and its body in one write (``gateway/edge/server.py``, ``HeadCork``).

uvicorn writes an answer's head and its body apart: two ``send`` syscalls, two TCP segments
for the gateway and for its client. ``HeadCork`` holds the head back until the body's first
bytes. Measured on a real process started with ``server_command``, over raw sockets: the
client's own ``TCP_INFO`` counts the segments that brought it data; a stream's head must
still leave before its module sends a byte of body; ``100 Continue`` must not be held.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from tests.reliability.conftest import TOKEN, base_env, prepare_database, request_bytes
from tests.servers import GatewayProcess, UpstreamServer

pytestmark = pytest.mark.reliability

OP = [("X-VX11-Token", TOKEN), ("Content-Type", "application/json")]
#: ``struct tcp_info``: ``tcpi_data_segs_in`` (Linux ≥ 4.6) is the u32 at this offset.
DATA_SEGS_IN = 152


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(upstream: UpstreamServer) -> Iterator[GatewayProcess]:
    config = base_env(tempfile.mkdtemp(prefix="vx11-cork-"), upstream.url)
    prepare_database(config)
    gateway = GatewayProcess(config).start()
    yield gateway
    gateway.stop()


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= DATA_SEGS_IN + 4, "this kernel's tcp_info has no tcpi_data_segs_in"
    return int(struct.unpack_from("I", info, DATA_SEGS_IN)[0])


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("path", ["/vx11/route/task", "/health"])
def test_a_buffered_answer_reaches_the_client_in_one_segment(server: GatewayProcess, path: str):
    """Before HeadCork: 2 (the head, then the body), on every answer of the gateway."""
    method = "POST" if path.startswith("/vx11/route") else "GET"
    body = b'{"prompt":"one write"}' if method == "POST" else b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_bytes(method, path, OP, body))
        answer = read_all(sock)
        segments = data_segments_in(sock)
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    assert len(content) == length > 0
    assert segments == 1, f"head and body came in {segments} segments"


def test_a_streams_head_is_not_held_for_its_first_chunk(
    server: GatewayProcess, upstream: UpstreamServer
):
    """The module sends its head, then nothing until the client has the gateway's head: a
    head held until the body's first bytes would never come (the test times out)."""
    release = threading.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(200):  # at most 10 s
            if release.is_set():
                break
            await asyncio.sleep(0.05)
        await response.write(b"data: after the head\n\n")
        await response.write_eof()
        return response

    upstream.route("POST", "/switch/task", handler, read_body=False)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(request_bytes("POST", "/vx11/route/stream", OP, b"{}"))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                assert chunk, "closed before the head"
                head += chunk
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
            assert b"after the head" not in head
            release.set()
            rest = read_all(sock)
        assert b"data: after the head" in head + rest
    finally:
        release.set()
        upstream.handlers.pop(("POST", "/switch/task"), None)


def test_100_continue_is_not_held_back(server: GatewayProcess, upstream: UpstreamServer):
    """``Expect: 100-continue``: the interim answer leaves at once (it is written before the
    response starts: the cork passes it through), then the body; the answer's head still
    waits for its body: two segments in all."""
    body = b'{"prompt":"after continue"}'
    request = request_bytes("POST", "/vx11/route/task", [*OP, ("Expect", "100-continue")], body)
    head, _, _ = request.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + b"\r\n\r\n")
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim[:200]
        sock.sendall(body)
        answer = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :] + read_all(sock)
        segments = data_segments_in(sock)
    assert segments == 2, f"100 Continue, head and body came in {segments} segments"
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert upstream.seen[-1].body == body
