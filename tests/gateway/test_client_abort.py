"""Clients that leave or stall are never a module's failure (issue #12, items 3 and 4).

Raw sockets against the live gateway and a real upstream: a client that hangs up before,
during or after its upload, or while its answer streams, leaves the module's breaker
closed (a half-open probe it took is given back at once) and is counted as status 499; a
client whose body makes no progress for ``VX11_CLIENT_BODY_TIMEOUT`` gets a 408, its
upstream call is cancelled and its backpressure slot is free again.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from tests.conftest import OPERATOR_TOKEN, wait_until

H = {"X-VX11-Token": OPERATOR_TOKEN}


def head(path: str, *lines: str) -> bytes:
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *lines, "", ""]).encode()


def shub_count(status: str, method: str = "POST", path: str = "/shub/health") -> float:
    labels = {"status": status, "path": path, "method": method}
    return REGISTRY.get_sample_value("shub_proxy_requests_total", labels) or 0.0


def intent_count(status: str, intent: str = "task", module: str = "switch") -> float:
    labels = {"intent": intent, "module": module, "status": status}
    return REGISTRY.get_sample_value("vx11_requests_total", labels) or 0.0


def breaker(http: httpx.Client, module: str) -> dict[str, Any]:
    r = http.get("/vx11/circuit-breaker/status", headers=H)
    assert r.status_code == 200, r.text
    state: dict[str, Any] = r.json()["breakers"][module]
    return state


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one answer (the gateway closes after it: ``Connection: close``)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split(" ")[1]), headers, body


class Reading:
    """An upstream handler that records that a request started and how its body ended."""

    def __init__(self) -> None:
        self.started = 0
        self.broken = 0
        self.complete = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.started += 1
        try:
            await request.read()
        except ConnectionError:
            self.broken += 1
            return web.Response(status=400)  # nobody is left to read it
        self.complete += 1
        return web.json_response({"ok": True})


def test_uploads_abandoned_mid_body_never_open_the_breaker(http, upstream):
    """Today's attack: three anonymous aborted POST /shub/health opened shub's breaker."""
    reading = Reading()
    upstream.route("POST", "/health", reading, read_body=False)
    before, before_502 = shub_count("499"), shub_count("502")
    for n in range(5):
        with socket.create_connection(("127.0.0.1", http.base_url.port or 80)) as sock:
            sock.sendall(head("/shub/health", "Content-Length: 1000") + b"0123456789")
            # The gateway is streaming the body upstream: the module's handler has started.
            assert wait_until(lambda n=n: reading.started == n + 1)
        # the socket is closed here, 990 bytes short
    assert wait_until(lambda: reading.broken == 5)
    assert wait_until(lambda: shub_count("499") - before == 5)
    state = breaker(http, "shub")
    assert (state["state"], state["failure_count"]) == ("closed", 0)
    assert shub_count("502") == before_502  # counted as 499, never as a 502
    r = http.post("/shub/health", content=b"{}")
    assert r.status_code == 200 and reading.complete == 1


def test_chunked_uploads_abandoned_mid_body_never_open_the_breaker(http, upstream):
    reading = Reading()
    upstream.route("POST", "/switch/task", reading, read_body=False)
    before = intent_count("499")
    for n in range(4):
        with socket.create_connection(("127.0.0.1", http.base_url.port or 80)) as sock:
            sock.sendall(
                head(
                    "/vx11/route/task",
                    f"X-VX11-Token: {OPERATOR_TOKEN}",
                    "Transfer-Encoding: chunked",
                )
                + b"5\r\nhello\r\n"
            )
            assert wait_until(lambda n=n: reading.started == n + 1)
    assert wait_until(lambda: intent_count("499") - before == 4)
    state = breaker(http, "switch")
    assert (state["state"], state["failure_count"]) == ("closed", 0)


def test_a_client_that_leaves_before_its_body_is_counted_499_and_not_forwarded(http, upstream):
    before = shub_count("499")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", http.base_url.port or 80)) as sock:
            sock.sendall(head("/shub/health", "Content-Length: 1000"))
    assert wait_until(lambda: shub_count("499") - before == 3)
    assert not [s for s in upstream.seen if s.path == "/health"]
    assert breaker(http, "shub")["state"] == "closed"


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_an_aborted_upload_gives_the_half_open_probe_back(http, upstream, gw_env, request, store):
    """The probe it took is released: the next caller probes at once and closes the breaker
    (before, the abort was the probe's failure and reopened the breaker for 60 s)."""
    redis_url = request.getfixturevalue("redis_url") if store == "redis" else None
    # Long enough that the breaker cannot turn half-open before it is seen open on a loaded
    # machine (0.3 s once did under -n 4), and that a probe failure would keep it open well
    # past the next request; the test waits for half-open explicitly.
    gw_env.set(VX11_CB_RECOVERY_TIMEOUT="2", VX11_REDIS_URL=redis_url)
    upstream.respond("POST", "/switch/task", status=503)
    for _ in range(3):
        assert http.post("/vx11/route/task", json={}, headers=H).status_code == 503
    assert breaker(http, "switch")["state"] == "open"
    reading = Reading()
    upstream.route("POST", "/switch/task", reading, read_body=False)
    assert wait_until(lambda: breaker(http, "switch")["state"] == "half_open", timeout=10)
    with socket.create_connection(("127.0.0.1", http.base_url.port or 80)) as sock:
        sock.sendall(
            head("/vx11/route/task", f"X-VX11-Token: {OPERATOR_TOKEN}", "Content-Length: 100")
            + b"{"
        )
        assert wait_until(lambda: reading.started == 1)  # this upload holds the probe
    assert wait_until(lambda: reading.broken == 1)
    r = http.post("/vx11/route/task", json={}, headers=H)
    assert r.status_code == 200, r.text  # the probe's slot was free: no 30 s lease to wait
    assert breaker(http, "switch")["state"] == "closed"


async def test_a_client_that_leaves_a_streamed_answer_is_499_and_no_failure(gateway, upstream):
    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(50):
            await response.write(f"data: {n}\n\n".encode())
            await asyncio.sleep(0.05)
        return response

    upstream.route("POST", "/switch/task", slow_stream)
    before = intent_count("499")
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    body = b"{}"
    writer.write(
        head("/vx11/route/task", f"X-VX11-Token: {OPERATOR_TOKEN}", f"Content-Length: {len(body)}")
        + body
    )
    await writer.drain()
    assert b"data: 0" in await reader.readuntil(b"data: 0")
    writer.close()
    await writer.wait_closed()
    deadline = time.monotonic() + 5
    while intent_count("499") - before < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert intent_count("499") - before == 1
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        r = await client.get("/vx11/circuit-breaker/status", headers=H)
    switch = r.json()["breakers"]["switch"]
    assert (switch["state"], switch["failure_count"]) == ("closed", 0)


# --------------------------------------------------------------------------- slow bodies


def test_a_trickling_body_gets_408_and_frees_its_slot(http, upstream, gw_env):
    """Content-Length 1000, 10 bytes, then nothing: 408 after VX11_CLIENT_BODY_TIMEOUT, the
    upstream call is cancelled, the breaker stays closed, the only slot is free again."""
    gw_env.set(VX11_CLIENT_BODY_TIMEOUT="0.5", VX11_MAX_INFLIGHT="1", VX11_QUEUE_MAX="0")
    reading = Reading()
    upstream.route("POST", "/health", reading, read_body=False)
    with socket.create_connection(("127.0.0.1", http.base_url.port or 80), timeout=10) as sock:
        sock.sendall(head("/shub/health", "Content-Length: 1000") + b"0123456789")
        started = time.monotonic()
        status, headers, body = read_answer(sock)
        waited = time.monotonic() - started
    assert status == 408, body
    problem = json.loads(body)
    assert problem["error"] == "request_timeout" and problem["status"] == 408
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert 0.45 <= waited < 2.0
    assert wait_until(lambda: reading.broken == 1)  # the upstream call was cancelled
    state = breaker(http, "shub")
    assert (state["state"], state["failure_count"]) == ("closed", 0)
    r = http.post("/shub/health", content=b"{}")  # VX11_MAX_INFLIGHT=1: the slot is free
    assert r.status_code == 200, r.text


def test_a_body_that_never_starts_gets_408_without_reaching_the_module(http, upstream, gw_env):
    gw_env.set(VX11_CLIENT_BODY_TIMEOUT="0.3")
    with socket.create_connection(("127.0.0.1", http.base_url.port or 80), timeout=10) as sock:
        sock.sendall(
            head("/vx11/route/task", f"X-VX11-Token: {OPERATOR_TOKEN}", "Content-Length: 50")
        )
        started = time.monotonic()
        status, _, body = read_answer(sock)
        waited = time.monotonic() - started
    assert status == 408 and json.loads(body)["error"] == "request_timeout"
    assert 0.25 <= waited < 2.0
    assert not upstream.seen


def test_a_slow_but_steady_body_is_not_cut(http, upstream, gw_env):
    """Each piece restarts the timeout: 6 pieces 0.15 s apart (0.9 s) under a 0.4 s timeout."""
    gw_env.set(VX11_CLIENT_BODY_TIMEOUT="0.4")
    pieces = [b'{"a": "', b"x" * 10, b"y" * 10, b"z" * 10, b"w" * 10, b'"}']
    size = sum(len(p) for p in pieces)
    with socket.create_connection(("127.0.0.1", http.base_url.port or 80), timeout=10) as sock:
        sock.sendall(
            head(
                "/vx11/route/task",
                f"X-VX11-Token: {OPERATOR_TOKEN}",
                f"Content-Length: {size}",
                "Connection: close",
            )
        )
        for piece in pieces:
            time.sleep(0.15)  # the client's pace under test, not a wait for the gateway
            sock.sendall(piece)
        status, _, body = read_answer(sock)
    assert status == 200, body
    assert upstream.seen[-1].json() == {"a": "x" * 10 + "y" * 10 + "z" * 10 + "w" * 10}


def test_a_slow_but_moving_upload_past_the_deadline_is_not_a_module_failure(http, upstream, gw_env):
    """A chunked upload that keeps moving (so never 408) until the route's deadline passes:
    the module was reached, but the timeout is the upload's doing, not the module's. Three
    of them used to open the breaker (any client could, repeatedly)."""
    gw_env.set(VX11_SHUB_TIMEOUT="0.6", VX11_CLIENT_BODY_TIMEOUT="5")
    reading = Reading()
    upstream.route("POST", "/health", reading, read_body=False)
    for n in range(3):
        with socket.create_connection(("127.0.0.1", http.base_url.port or 80), timeout=10) as sock:
            sock.sendall(head("/shub/health", "Transfer-Encoding: chunked") + b"1\r\na\r\n")
            assert wait_until(lambda n=n: reading.started == n + 1)
            status = 0
            for _ in range(20):  # one byte every 0.1 s, for longer than the 0.6 s deadline
                time.sleep(0.1)  # the client's pace under test
                try:
                    sock.sendall(b"1\r\nb\r\n")
                except OSError:
                    break
            data = b""
            while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
            status = int(data.split(b" ", 2)[1])
        assert status == 504, data
    state = breaker(http, "shub")
    assert (state["state"], state["failure_count"]) == ("closed", 0)
    assert http.post("/shub/health", content=b"{}").status_code == 200


async def test_a_streamed_probe_closes_the_breaker_at_its_head(gateway, upstream, gw_env):
    """A half-open probe whose answer streams for longer than one would wait: its outcome
    is its head's status, so the breaker closes at once instead of staying half-open (and
    refusing everyone) for the length of the stream or until the probe's lease expires."""
    gw_env.set(VX11_CB_RECOVERY_TIMEOUT="0.2")
    upstream.respond("POST", "/switch/task", status=503)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        for _ in range(3):
            assert (await client.post("/vx11/route/task", json={}, headers=H)).status_code == 503
        release = threading.Event()  # the upstream runs on a loop of its own

        async def long_stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: first\n\n")
            while not release.is_set():
                await asyncio.sleep(0.02)
            await response.write(b"data: last\n\n")
            return response

        upstream.route("POST", "/switch/task", long_stream)
        await asyncio.sleep(0.3)  # open -> half-open
        async with client.stream("POST", "/vx11/route/task", json={}, headers=H) as probe:
            assert probe.status_code == 200
            chunks = probe.aiter_bytes()
            assert b"first" in await anext(chunks)
            status = (await client.get("/vx11/circuit-breaker/status", headers=H)).json()
            assert status["breakers"]["switch"]["state"] == "closed"  # mid-stream
            upstream.respond("POST", "/switch/task", body={"ok": True})
            other = await client.post("/vx11/route/task", json={}, headers=H)
            assert other.status_code == 200, other.text
            release.set()
            rest = b"".join([c async for c in chunks])
        assert b"last" in rest
