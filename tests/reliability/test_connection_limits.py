"""Hostile clients at the HTTP server layer (``gateway/edge/server.py``), against a real process.

Huge request heads, heads that trickle in, connections that never send a byte, and more
connections than a worker takes: each is measured on a real ``uvicorn`` process started
with ``server_command`` (the production flags), over raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator

import orjson
import pytest

from tests.reliability.conftest import (
    TOKEN,
    RawAnswer,
    base_env,
    figure,
    pid_of,
    prepare_database,
    raw_request,
    request_bytes,
    rss_kib,
)
from tests.servers import GatewayProcess, UpstreamServer

pytestmark = pytest.mark.reliability

HEAD_TIMEOUT = 1.0  # VX11_CLIENT_HEADER_TIMEOUT in these tests
KEEP_ALIVE = 1  # --timeout-keep-alive in these tests
OP = [("X-VX11-Token", TOKEN), ("Content-Type", "application/json")]


def start_gateway(
    echo: UpstreamServer, keep_alive: int = KEEP_ALIVE, **env: object
) -> GatewayProcess:
    config = base_env(tempfile.mkdtemp(prefix="vx11-conn-"), echo.url, **env)
    prepare_database(config)
    args = ("--timeout-keep-alive", str(keep_alive))
    return GatewayProcess(config, server_args=args).start()


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(upstream: UpstreamServer) -> Iterator[GatewayProcess]:
    gateway = start_gateway(upstream, VX11_CLIENT_HEADER_TIMEOUT=HEAD_TIMEOUT)
    yield gateway
    gateway.stop()


def kept_alive(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    """``request_bytes`` without its ``Connection: close``."""
    data = request_bytes(method, target, headers, body)
    return data.replace(b"\r\nConnection: close\r\n\r\n", b"\r\n\r\n", 1)


def is_problem(answer: RawAnswer, status: int, error: str) -> bool:
    return (
        answer.status == status
        and answer.headers.get("content-type") == "application/problem+json"
        and answer.headers.get("connection") == "close"
        and orjson.loads(answer.body)["error"] == error
        and orjson.loads(answer.body)["correlation_id"] == answer.headers["x-correlation-id"]
    )


async def closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes (EOF or reset); fails past ``limit``."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), limit):
            pass
    return time.monotonic() - start


# --------------------------------------------------------------------------- huge heads


async def _send_huge_head(port: int, size: int) -> str:
    """Send ``size`` bytes of one header value, reading the answer while sending."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
    answer = asyncio.ensure_future(reader.readline())
    chunk = b"a" * (1 << 20)
    outcome = "closed"
    try:
        for _ in range(size // len(chunk)):
            if answer.done():
                break
            writer.write(chunk)
            await writer.drain()
        else:
            writer.write(b"\r\n\r\n")
            await writer.drain()
        line = await asyncio.wait_for(answer, 10)
        outcome = line.decode("latin-1").split(" ")[1] if line else "closed"
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        answer.cancel()
        writer.close()
    return outcome


async def test_huge_header_blocks_leave_memory_bounded(server: GatewayProcess):
    """4 senders of a 64 MiB header block: each gets 431 (or a closed connection) at once."""
    pid = pid_of(server)
    before = rss_kib(pid)
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(_send_huge_head(server.port, 64 << 20) for _ in range(4))), 20
    )
    took = time.monotonic() - started
    sampler.cancel()
    peak = max(peak, rss_kib(pid))
    figure(
        "4 x 64 MiB header blocks",
        f"answers {outcomes} in {took:.1f} s; RSS {before // 1024} MiB before, "
        f"peak {peak // 1024} MiB",
    )
    assert set(outcomes) <= {"431", "closed"} and "431" in outcomes
    assert peak - before < 30 * 1024
    assert took < 10
    healthy = await raw_request(server.port, request_bytes("GET", "/health", []))
    assert healthy.status == 200


@pytest.mark.parametrize(
    "kind", ["65 KiB value, proxy path", "1 MiB value, Django", "101 headers", "64 KiB URL"]
)
async def test_oversized_heads_get_431(server: GatewayProcess, upstream: UpstreamServer, kind: str):
    if kind == "65 KiB value, proxy path":
        data = request_bytes("POST", "/vx11/route/task", [*OP, ("X-Big", "a" * 66560)], b"{}")
    elif kind == "1 MiB value, Django":
        data = request_bytes("GET", "/vx11/routes", [*OP, ("X-Big", "a" * (1 << 20))])
    elif kind == "101 headers":
        extra = [(f"X-H{i}", "v") for i in range(101 - len(OP) - 2)]  # + Host, Content-Length
        data = request_bytes("POST", "/vx11/route/task", [*OP, *extra], b"{}")
    else:
        data = request_bytes("GET", "/health?" + "q" * 65536, [])
    seen = len(upstream.seen)
    answer = await raw_request(server.port, data)
    assert is_problem(answer, 431, "invalid_request"), (answer.status, answer.body[:200])
    assert len(upstream.seen) == seen


async def test_every_request_on_a_kept_alive_connection_is_bounded(
    server: GatewayProcess, upstream: UpstreamServer
):
    """A small request, then one with a 100 KiB body sent with its head, then a huge head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        answers = []
        for data in (
            kept_alive("GET", "/health", []),
            kept_alive("POST", "/vx11/route/task", OP, b'{"x": "' + b"b" * 100_000 + b'"}'),
            kept_alive("GET", "/health", [("X-Big", "a" * 70_000)]),
        ):
            writer.write(data)
            answers.append(await asyncio.wait_for(read_answer(reader), 5))
    finally:
        writer.close()
    assert [a.status for a in answers] == [200, 200, 431]
    assert len(upstream.seen[-1].body) > 100_000
    assert is_problem(answers[2], 431, "invalid_request")


async def test_pipelined_requests_are_bounded_one_by_one(server: GatewayProcess):
    """Three requests in one write, the last with a 70 KiB header: 200, 200, then 431."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            kept_alive("GET", "/health", [])
            + kept_alive("GET", "/health", [])
            + kept_alive("GET", "/health", [("X-Big", "a" * 70_000)])
        )
        answers = [await asyncio.wait_for(read_answer(reader), 5) for _ in range(3)]
    finally:
        writer.close()
    assert [a.status for a in answers] == [200, 200, 431]
    assert orjson.loads(answers[2].body)["error"] == "invalid_request"


async def read_answer(reader: asyncio.StreamReader) -> RawAnswer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:] if ":" in line)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawAnswer(int(lines[0].split()[1]), headers, body)


async def test_a_large_legitimate_head_is_served(server: GatewayProcess, upstream: UpstreamServer):
    """90 headers and 60 KiB of head reach the module (and Django) unchanged."""
    extra = [(f"X-Field-{i}", "v" * 680) for i in range(88)]
    data = request_bytes("POST", "/vx11/route/task", [*OP, *extra], b"{}")
    head = data.split(b"\r\n\r\n", 1)[0]
    assert 59 * 1024 < len(head) < 64 * 1024 and 88 < head.count(b"\r\n") <= 100
    answer = await raw_request(server.port, data)
    assert answer.status == 200, answer.body[:300]
    forwarded = {name.lower(): value for name, value in upstream.seen[-1].headers.items()}
    assert forwarded["x-field-87"] == "v" * 680
    django = await raw_request(server.port, request_bytes("GET", "/vx11/routes", [*OP, *extra]))
    assert django.status == 200


# --------------------------------------------------------------------------- slow and idle


async def test_a_slowloris_head_is_closed_at_the_head_timeout(server: GatewayProcess):
    """One header byte every 0.2 s: the connection is closed ~1 s after the first byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.2)

    trickler = asyncio.create_task(trickle())
    try:
        await closed_after(reader, 5)
    finally:
        trickler.cancel()
        writer.close()
    took = time.monotonic() - started
    figure("slowloris", f"closed {took:.2f} s after its first byte (head timeout 1 s)")
    assert HEAD_TIMEOUT * 0.9 < took < HEAD_TIMEOUT + 1.5


async def test_a_never_used_connection_is_closed_at_the_keep_alive_timeout(
    server: GatewayProcess,
):
    never_used = await asyncio.open_connection("127.0.0.1", server.port)
    used = await asyncio.open_connection("127.0.0.1", server.port)
    used[1].write(kept_alive("GET", "/health", []))
    assert (await read_answer(used[0])).status == 200
    try:
        took = await asyncio.gather(closed_after(never_used[0], 5), closed_after(used[0], 5))
    finally:
        never_used[1].close()
        used[1].close()
    figure("idle connections", f"never used closed after {took[0]:.2f} s, used {took[1]:.2f} s")
    assert all(KEEP_ALIVE * 0.9 < t < KEEP_ALIVE + 1.5 for t in took)


# --------------------------------------------------------------------------- connection cap


async def test_connections_past_the_cap_get_503_and_the_server_keeps_serving(
    upstream: UpstreamServer,
):
    """20 connections held: the next ones get 503 at once, the 20 admitted ones still work."""
    gateway = start_gateway(upstream, keep_alive=30, VX11_MAX_CONNECTIONS=20)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(kept_alive("GET", "/health", []))
            assert (await asyncio.wait_for(read_answer(reader), 5)).status == 200
            held.append((reader, writer))
        refused = [
            await raw_request(gateway.port, request_bytes("GET", "/health", [])) for _ in range(5)
        ]
        assert all(is_problem(a, 503, "service_overloaded") for a in refused), refused[0]
        assert refused[0].headers["retry-after"] == "1"
        for reader, writer in held:  # the admitted connections are never refused
            writer.write(kept_alive("GET", "/health", []))
            assert (await asyncio.wait_for(read_answer(reader), 5)).status == 200
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.3)
    after = await raw_request(gateway.port, request_bytes("GET", "/health", []))
    gateway.stop()
    assert after.status == 200
    assert "Traceback" not in gateway.output()


# --------------------------------------------------------------------------- trailers


CHUNKED = [*OP, ("Transfer-Encoding", "chunked")]


async def _send_endless_trailer(port: int, size: int) -> tuple[float, int]:
    """A chunked body, then one trailer field whose value never ends (``size`` bytes are
    offered); returns the seconds until the gateway closed, and the bytes it took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes("POST", "/vx11/route/task", CHUNKED, b"2\r\n{}\r\n0\r\nX-T: "))
    started = time.monotonic()
    closed = asyncio.ensure_future(closed_after(reader, 10))
    chunk = b"a" * (1 << 16)
    sent = 0
    try:
        with contextlib.suppress(ConnectionError):
            while sent < size and not closed.done():
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        await closed
    finally:
        closed.cancel()
        writer.close()
    return time.monotonic() - started, sent


async def test_an_endless_trailer_is_closed_and_memory_stays_bounded(server: GatewayProcess):
    """2 chunked POSTs with a trailer value of up to 16 MiB: httptools would buffer it
    (by repeated concatenation) while the request runs; the connection is closed at once."""
    pid = pid_of(server)
    before = rss_kib(pid)
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(_send_endless_trailer(server.port, 16 << 20) for _ in range(2))), 30
    )
    sampler.cancel()
    peak = max(peak, rss_kib(pid))
    figure(
        "2 x 16 MiB trailer values",
        f"closed after {[f'{t:.2f} s' for t, _ in outcomes]}, "
        f"{[f'{s >> 10} KiB' for _, s in outcomes]} sent; "
        f"RSS {before // 1024} MiB before, peak {peak // 1024} MiB",
    )
    assert all(took < 3 for took, _ in outcomes)
    assert peak - before < 16 * 1024
    healthy = await raw_request(server.port, request_bytes("GET", "/health", []))
    assert healthy.status == 200


async def test_request_trailers_never_reach_the_module(
    server: GatewayProcess, upstream: UpstreamServer
):
    """Fields after a chunked body are dropped: never forwarded, never a session id."""
    body = b'7\r\n{"a":1}\r\n0\r\nX-VX11-Session: evil\r\nX-Trailer-Probe: 1\r\n\r\n'
    seen = len(upstream.seen)
    answer = await raw_request(
        server.port, request_bytes("POST", "/vx11/route/task", CHUNKED, body)
    )
    assert answer.status == 200, answer.body[:300]
    assert len(upstream.seen) == seen + 1
    forwarded = {name.lower() for name in upstream.seen[-1].headers}
    assert "x-trailer-probe" not in forwarded and "x-vx11-session" not in forwarded
    assert upstream.seen[-1].body == b'{"a":1}'
