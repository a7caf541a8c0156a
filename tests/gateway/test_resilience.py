"""Breaker, retries and backpressure through the real gateway and a real upstream."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
from aiohttp import web
from asgiref.sync import sync_to_async

from gateway.models import Route
from tests.conftest import OPERATOR_TOKEN
from tests.servers import free_port

H = {"X-VX11-Token": OPERATOR_TOKEN}


def test_breaker_trips_after_three_503_and_answers_without_calling_upstream(http, upstream):
    upstream.respond("POST", "/switch/task", status=503, body={"down": True})
    for _ in range(3):
        assert http.post("/vx11/route/task", json={}, headers=H).status_code == 503
    calls = len(upstream.seen)
    r = http.post("/vx11/route/task", json={}, headers=H)
    assert r.status_code == 503
    body = r.json()
    assert body["error"] == "circuit_open" and body["module"] == "switch"
    assert body["state"] == "open" and body["status"] == 503
    assert 0 < body["retry_after"] <= 60
    assert int(r.headers["retry-after"]) == body["retry_after"]
    assert len(upstream.seen) == calls  # refused at once, upstream not called


def test_breaker_does_not_trip_on_4xx(http, upstream):
    upstream.respond("POST", "/switch/task", status=404, body={"nope": True})
    for _ in range(5):
        assert http.post("/vx11/route/task", json={}, headers=H).status_code == 404
    assert len(upstream.seen) == 5


def test_connect_failures_trip_the_breaker(http, gw_env):
    gw_env.set(VX11_MODULE_SWITCH_URL=f"http://127.0.0.1:{free_port()}")
    codes = [http.post("/vx11/route/task", json={}, headers=H).json()["error"] for _ in range(4)]
    assert codes == ["upstream_unavailable"] * 3 + ["circuit_open"]


def test_breaker_disabled_never_refuses(http, upstream, gw_env):
    gw_env.set(VX11_CB_ENABLED="false")
    upstream.respond("POST", "/switch/task", status=503)
    for _ in range(6):
        assert http.post("/vx11/route/task", json={}, headers=H).status_code == 503
    assert len(upstream.seen) == 6


def test_breaker_threshold_comes_from_settings(http, upstream, gw_env):
    gw_env.set(VX11_CB_FAILURE_THRESHOLD="5")
    upstream.respond("POST", "/switch/task", status=500)
    errors = [http.post("/vx11/route/task", json={}, headers=H).status_code for _ in range(6)]
    assert errors[:5] == [500] * 5 and errors[5] == 503


def _flaky(failures: int, status: int = 503):
    state = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        state["n"] += 1
        if state["n"] <= failures:
            return web.json_response({"attempt": state["n"]}, status=status)
        return web.json_response({"attempt": state["n"], "ok": True})

    return handler


def test_get_route_is_retried_to_success(http, upstream):
    Route.objects.create(intent="task", method="GET")
    upstream.route("GET", "/switch/task", _flaky(1))
    r = http.post("/vx11/route/task", headers=H)
    assert r.status_code == 200 and r.json()["ok"]
    assert r.headers["x-vx11-attempts"] == "2"
    assert [s.method for s in upstream.seen] == ["GET", "GET"]


def test_put_with_body_is_replayed_on_retry(http, upstream):
    Route.objects.create(intent="task", method="PUT")
    upstream.route("PUT", "/switch/task", _flaky(2, status=502))
    r = http.post("/vx11/route/task", json={"keep": "me"}, headers=H)
    assert r.status_code == 200 and r.headers["x-vx11-attempts"] == "3"
    assert [s.json() for s in upstream.seen] == [{"keep": "me"}] * 3


def test_post_is_not_retried(http, upstream):
    upstream.route("POST", "/switch/task", _flaky(1))
    r = http.post("/vx11/route/task", json={}, headers=H)
    assert r.status_code == 503 and r.headers["x-vx11-attempts"] == "1"
    assert len(upstream.seen) == 1


def test_post_with_idempotency_key_is_retried_only_where_the_route_allows(http, upstream):
    upstream.route("POST", "/switch/task", _flaky(1))
    r = http.post("/vx11/route/task", json={}, headers={**H, "Idempotency-Key": "k1"})
    assert r.headers["x-vx11-attempts"] == "1"  # route does not allow it
    Route.objects.create(intent="task", retry_post=True)
    upstream.route("POST", "/switch/task", _flaky(1))
    r = http.post("/vx11/route/task", json={}, headers={**H, "Idempotency-Key": "k2"})
    assert r.status_code == 200 and r.headers["x-vx11-attempts"] == "2"


def test_non_retryable_status_is_not_retried(http, upstream):
    Route.objects.create(intent="task", method="GET")
    upstream.route("GET", "/switch/task", _flaky(1, status=500))
    r = http.post("/vx11/route/task", headers=H)
    assert r.status_code == 500 and r.headers["x-vx11-attempts"] == "1"


def test_retries_stay_inside_the_route_deadline(http, upstream):
    """Backoff 0.1 s, 0.5 s, 2.5 s: with a 1 s deadline the third retry cannot start."""
    Route.objects.create(intent="task", method="GET", timeout=1.0)
    upstream.respond("GET", "/switch/task", status=503)
    started = time.monotonic()
    r = http.post("/vx11/route/task", headers=H)
    elapsed = time.monotonic() - started
    assert r.status_code == 503
    assert r.headers["x-vx11-attempts"] == "3"  # t=0, t≈0.1, t≈0.6; t≈3.1 is past 1 s
    assert elapsed < 1.0 + 0.5


def test_upstream_retry_after_is_honoured(http, upstream):
    Route.objects.create(intent="task", method="GET", timeout=5)
    state: dict[str, list[float]] = {"times": []}

    async def handler(request: web.Request) -> web.Response:
        state["times"].append(time.monotonic())
        if len(state["times"]) == 1:
            return web.json_response({}, status=503, headers={"Retry-After": "1"})
        return web.json_response({"ok": True})

    upstream.route("GET", "/switch/task", handler)
    r = http.post("/vx11/route/task", headers=H)
    assert r.status_code == 200
    assert state["times"][1] - state["times"][0] >= 0.95


async def test_retry_budget_stops_a_retry_storm(gateway, upstream, gw_env):
    """40 concurrent GETs against a module that always answers 503, breaker off:
    upstream sees at most 1.2x the requests plus what the floor allows (three retries in
    flight at once; each request retries at most VX11_RETRY_MAX = 3 times).

    Measured: 54 = 40 + 8 (20 %) + 3 + 3 (the floor, for the second and third retries)."""
    gw_env.set(VX11_CB_ENABLED="false")
    await sync_to_async(Route.objects.create)(intent="task", method="GET", timeout=10)
    upstream.respond("GET", "/switch/task", status=503)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as client:
        answers = await asyncio.gather(
            *(client.post("/vx11/route/task", headers=H) for _ in range(40))
        )
    assert all(a.status_code == 503 for a in answers)
    assert 40 < len(upstream.seen) <= 40 * 1.2 + 3 * 3


def test_a_quiet_gateway_still_retries_after_earlier_retries(http, upstream):
    """SPEC §7: the budget's minimum is three retries *in flight*, not three per window.

    One request at a time against a module whose every other answer is a 503: each is
    retried once and answered 200, the seventh as the first (before: from the fourth
    on, the budget refused every retry until traffic grew, and the 503s opened the
    breaker)."""
    Route.objects.create(intent="task", method="GET")
    state = {"n": 0}

    async def alternating(request: web.Request) -> web.Response:
        state["n"] += 1
        if state["n"] % 2:
            return web.json_response({"attempt": state["n"]}, status=503)
        return web.json_response({"attempt": state["n"], "ok": True})

    upstream.route("GET", "/switch/task", alternating)
    answers = [http.post("/vx11/route/task", headers=H) for _ in range(7)]
    assert [(a.status_code, a.headers["x-vx11-attempts"]) for a in answers] == [(200, "2")] * 7
    assert len(upstream.seen) == 14


# --------------------------------------------------------------------------- answers that break


class RawUpstream:
    """A module that answers every request with the same bytes, then closes.

    Reads the request head and its ``Content-Length`` body first, so the gateway's
    request is complete when the answer comes.
    """

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                self.requests += 1
                conn.sendall(self.answer)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def raw_upstream():
    servers: list[RawUpstream] = []

    def start(answer: bytes) -> RawUpstream:
        server = RawUpstream(answer)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _exchange(port: int, data: bytes) -> bytes:
    """Send one request on a raw socket; everything the gateway writes until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


TASK = (
    b"POST /vx11/route/task HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    b"X-VX11-Token: " + OPERATOR_TOKEN.encode() + b"\r\nContent-Length: 2\r\n\r\n{}"
)


def test_a_small_answer_cut_short_is_a_clean_502_and_a_breaker_failure(
    http, gateway, gw_env, raw_upstream
):
    module = raw_upstream(
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"cut": '
    )
    gw_env.set(VX11_MODULE_SWITCH_URL=module.url)
    for _ in range(3):
        r = http.post("/vx11/route/task", json={}, headers=H)
        assert r.status_code == 502 and r.json()["error"] == "bad_gateway"  # not a 200
    r = http.post("/vx11/route/task", json={}, headers=H)
    assert r.status_code == 503 and r.json()["error"] == "circuit_open"
    assert module.requests == 3
    status = http.get("/vx11/circuit-breaker/status", headers=H).json()["breakers"]["switch"]
    assert (status["state"], status["failure_count"]) == ("open", 3)


@pytest.mark.parametrize(
    "rest",
    [
        pytest.param(b"5\r\nhello\r\n", id="cut-short"),
        pytest.param(b"5\r\nhello\r\nzz\r\nbroken\r\n", id="broken-chunk-size"),
    ],
)
def test_a_streamed_answer_that_breaks_is_aborted_and_a_breaker_failure(
    http, gateway, gw_env, raw_upstream, rest
):
    """The client sees the head and the bytes that came, then the connection closes without
    the terminating chunk: never a complete 200. Three of them open the breaker."""
    module = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n" + rest
    )
    gw_env.set(VX11_MODULE_SWITCH_URL=module.url)
    for _ in range(3):
        received = _exchange(gateway.port, TASK)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
        assert not body.endswith(b"0\r\n\r\n")  # aborted: no last chunk
    r = http.post("/vx11/route/task", json={}, headers=H)
    assert r.status_code == 503 and r.json()["error"] == "circuit_open"
    assert module.requests == 3


def test_a_complete_answer_read_after_its_head_is_recorded_once_as_success(http, upstream):
    """Failures, then a success whose body is read: the consecutive count starts over."""
    upstream.respond("POST", "/switch/task", status=503)
    for _ in range(2):
        assert http.post("/vx11/route/task", json={}, headers=H).status_code == 503
    upstream.respond("POST", "/switch/task", body=b"x" * 100_000)  # streamed (> 64 KiB)
    assert http.post("/vx11/route/task", json={}, headers=H).content == b"x" * 100_000
    status = http.get("/vx11/circuit-breaker/status", headers=H).json()["breakers"]["switch"]
    assert (status["state"], status["failure_count"]) == ("closed", 0)


# --------------------------------------------------------------------------- backpressure


async def test_load_is_shed_by_priority(gateway, upstream, gw_env):
    """One slot, two queue places, a slow upstream: who is shed and who is served."""
    gw_env.set(
        VX11_MAX_INFLIGHT="1",
        VX11_QUEUE_MAX="2",
        VX11_RATE_LIMIT_ENABLED="false",
        VX11_CB_ENABLED="false",
    )
    order: list[str] = []

    def slow(name: str):
        async def handler(request: web.Request) -> web.Response:
            order.append(name)
            await asyncio.sleep(0.4)
            return web.json_response({"ok": True})

        return handler

    upstream.route("POST", "/switch/task", slow("other"))
    upstream.route("POST", "/madre/task", slow("analysis"))
    upstream.route("GET", "/health", slow("health"))
    gw_h = {**H, "X-VX11-GW-Token": "unused"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as client:

        async def call(path: str, delay: float) -> tuple[str, int, str]:
            await asyncio.sleep(delay)
            if path == "/shub/health":
                r = await client.get(path)
            else:
                r = await client.post(path, json={}, headers=gw_h)
            return path, r.status_code, r.json().get("error", "") if r.status_code >= 400 else ""

        results = await asyncio.gather(
            call("/vx11/route/task", 0.0),  # takes the slot
            call("/vx11/route/task", 0.1),  # queued (other #1)
            call("/vx11/route/task", 0.15),  # queued (other #2): queue full
            call("/vx11/route/analysis", 0.2),  # sheds other #2
            call("/shub/health", 0.25),  # sheds other #1
            call("/vx11/route/task", 0.3),  # queue full of better work: shed itself
        )
    codes = [(path, code, err) for path, code, err in results]
    assert codes[0][1] == 200
    assert codes[1][1:] == (503, "service_overloaded")
    assert codes[2][1:] == (503, "service_overloaded")
    assert codes[3][1] == 200 and codes[4][1] == 200
    assert codes[5][1:] == (503, "service_overloaded")
    assert order == ["other", "health", "analysis"]  # served by priority


async def test_a_waiter_past_its_deadline_leaves_with_504(gateway, upstream, gw_env):
    gw_env.set(VX11_MAX_INFLIGHT="1", VX11_RATE_LIMIT_ENABLED="false")
    # The waiter's short deadline (code is a Context-7 route: its session is stored first).
    await sync_to_async(Route.objects.create)(intent="code", timeout=0.3)
    upstream.respond("POST", "/switch/task", delay=1.0)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as client:

        async def later():
            await asyncio.sleep(0.1)
            return await client.post("/vx11/route/code", json={"prompt": "x"}, headers=H)

        first, second = await asyncio.gather(
            client.post("/vx11/route/task", json={}, headers=H), later()
        )
    assert first.status_code == 200
    assert second.status_code == 504 and second.json()["error"] == "upstream_timeout"


@pytest.mark.parametrize("knob", ["VX11_MAX_INFLIGHT"])
def test_overloaded_answer_has_retry_after(http, gw_env, knob, upstream):
    gw_env.set(VX11_MAX_INFLIGHT="1", VX11_QUEUE_MAX="0", VX11_RATE_LIMIT_ENABLED="false")
    upstream.respond("POST", "/switch/task", delay=0.5)

    async def burst():
        async with httpx.AsyncClient(base_url=http.base_url, timeout=10) as client:
            return await asyncio.gather(
                *(client.post("/vx11/route/task", json={}, headers=H) for _ in range(3))
            )

    answers = asyncio.run(burst())
    shed = [a for a in answers if a.status_code == 503]
    assert shed and all(a.json()["error"] == "service_overloaded" for a in shed)
    assert all(int(a.headers["retry-after"]) >= 1 for a in shed)
