"""Streaming timeouts, SSE heartbeats and the connect timeout (SPEC §20, issue #15 item 3).

A live gateway in front of a real upstream (aiohttp) whose handlers pause where a stalled
model would. Durations are route overrides of a tenth of a second or so, so the file runs
in seconds: ``stream`` (streaming on, module switch, ``/switch/task``) for the streaming
route, ``task`` (same module and endpoint, streaming off) for the one-deadline route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from gateway.models import Route
from gateway.operations.config_apply import import_document
from gateway.operations.config_doc import DocumentError
from tests.conftest import OPERATOR_TOKEN, wait_until

H = {"X-VX11-Token": OPERATOR_TOKEN}
Step = float | bytes  # a pause (seconds) or bytes to write


def script(*steps: Step, content_type: str = "text/event-stream", head_after: float = 0.0):
    """An upstream handler: waits ``head_after``, sends its head, then plays ``steps``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if head_after:
            await asyncio.sleep(head_after)
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for step in steps:
            if isinstance(step, bytes):
                await response.write(step)
            else:
                await asyncio.sleep(step)
        await response.write_eof()
        return response

    return handler


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def breaker(http: httpx.Client) -> tuple[str, int]:
    state = http.get("/vx11/circuit-breaker/status", headers=H).json()["breakers"]["switch"]
    return state["state"], state["failure_count"]


def stream(http: httpx.Client, intent: str = "stream") -> tuple[httpx.Response, bytes, float]:
    """The whole answer as the client reads it, and how long it took."""
    started = time.monotonic()
    with http.stream("POST", f"/vx11/route/{intent}", json={}, headers=H) as r:
        body = b"".join(r.iter_raw())
    return r, body, time.monotonic() - started


def raw_exchange(port: int, intent: str) -> tuple[bytes, float]:
    """Every byte the gateway sends on a raw socket until it closes the connection."""
    body = b"{}"
    request = (
        f"POST /vx11/route/{intent} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-VX11-Token: "
        f"{OPERATOR_TOKEN}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - started


@pytest.fixture
def no_beats(gw_env: Any) -> None:
    gw_env.set(VX11_SSE_HEARTBEAT_SECONDS=0, VX11_RETRY_MAX=0)


# --------------------------------------------------------------------------- idle timeout


def test_idle_timeout_cuts_a_silent_sse_stream_with_an_error_event(http, upstream, no_beats):
    Route.objects.create(intent="stream", idle_timeout=0.3)
    upstream.route("POST", "/switch/task", script(b"data: 1\n\n", 1.2), read_body=False)
    cuts = sample("vx11_stream_cuts_total", module="switch", reason="idle")
    r, body, took = stream(http)
    assert r.status_code == 200 and took < 1.0
    first, _, rest = body.partition(b"\n\n")
    assert first == b"data: 1"
    assert rest.startswith(b"event: vx11-error\ndata: ") and rest.endswith(b"\n\n")
    problem = json.loads(rest.split(b"data: ", 1)[1])
    assert problem["error"] == "upstream_timeout" and problem["status"] == 504
    assert problem["correlation_id"] == r.headers["x-correlation-id"]
    assert "idle_timeout" in problem["detail"]
    # Counted as the stream's task ends, which may be just after the client read its end.
    assert wait_until(
        lambda: sample("vx11_stream_cuts_total", module="switch", reason="idle") == cuts + 1
    )
    assert breaker(http) == ("closed", 1)  # a stalled module: one failure (as a broken body)


def test_a_cut_chunked_stream_is_aborted_without_its_last_chunk(gateway, upstream, no_beats):
    Route.objects.create(intent="stream", idle_timeout=0.3)
    handler = script(b'{"n": 1}\n', 1.2, content_type="application/x-ndjson")
    upstream.route("POST", "/switch/task", handler, read_body=False)
    data, took = raw_exchange(gateway.port, "stream")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    assert b'{"n": 1}\n' in body
    assert not body.endswith(b"0\r\n\r\n") and b"vx11-error" not in body
    assert took < 1.0


def test_an_idle_cut_in_the_middle_of_an_event_ends_the_event_before_the_error(
    http, upstream, no_beats
):
    Route.objects.create(intent="stream", idle_timeout=0.3)
    upstream.route("POST", "/switch/task", script(b"data: hal", 1.2), read_body=False)
    _, body, _ = stream(http)
    assert body.startswith(b"data: hal\n\nevent: vx11-error\ndata: {")


# --------------------------------------------------------------------------- heartbeats


def test_an_idle_sse_stream_gets_heartbeats(http, upstream, gw_env):
    gw_env.set(VX11_SSE_HEARTBEAT_SECONDS=1)  # the shortest period there is
    Route.objects.create(intent="stream", idle_timeout=5)
    upstream.route(
        "POST", "/switch/task", script(b"data: a\n\n", 2.5, b"data: b\n\n"), read_body=False
    )
    r, body, _ = stream(http)
    assert r.status_code == 200
    assert body.startswith(b"data: a\n\n") and body.endswith(b"data: b\n\n")
    middle = body[len(b"data: a\n\n") : -len(b"data: b\n\n")]
    beats = middle.count(b": keep-alive\n\n")
    assert 2 <= beats <= 3 and middle == b": keep-alive\n\n" * beats


def test_heartbeats_never_go_inside_an_event(http, upstream, gw_env):
    """Half an event, a pause of 1.6 heartbeat periods, its end: nothing in between; the
    heartbeats resume once the event is whole."""
    gw_env.set(VX11_SSE_HEARTBEAT_SECONDS=1)
    Route.objects.create(intent="stream", idle_timeout=5)
    steps = (b"data: half", 1.6, b"\ndata: more", 0.3, b"\n\n")
    upstream.route("POST", "/switch/task", script(*steps), read_body=False)
    _, body, _ = stream(http)
    assert body == b"data: half\ndata: more\n\n"  # one event, nothing inside it
    steps = (b"data: half", 1.2, b"\n\n", 1.4, b"data: x\n\n")
    upstream.route("POST", "/switch/task", script(*steps), read_body=False)
    _, body, _ = stream(http)
    assert body.startswith(b"data: half\n\n: keep-alive\n\n") and body.endswith(b"data: x\n\n")


def test_no_heartbeats_when_off_or_not_sse(http, upstream, gw_env):
    gw_env.set(VX11_SSE_HEARTBEAT_SECONDS=0)
    Route.objects.create(intent="stream", idle_timeout=2)
    upstream.route("POST", "/switch/task", script(b"data: a\n\n", 0.4), read_body=False)
    assert stream(http)[1] == b"data: a\n\n"
    gw_env.set(VX11_SSE_HEARTBEAT_SECONDS=1)
    handler = script(b"a\n\n", 1.3, content_type="text/plain")
    upstream.route("POST", "/switch/task", handler, read_body=False)
    assert stream(http)[1] == b"a\n\n"


# --------------------------------------------------------------------------- max duration


def steady(events: int, every: float = 0.1) -> tuple[Step, ...]:
    steps: list[Step] = []
    for n in range(events):
        steps += [f"data: {n}\n\n".encode(), every]
    return tuple(steps)


def test_max_duration_cuts_a_steady_stream_and_is_not_the_modules_failure(http, upstream, no_beats):
    Route.objects.create(intent="stream", idle_timeout=0.5, max_duration=1)
    upstream.route("POST", "/switch/task", script(*steady(40)), read_body=False)
    cuts = sample("vx11_stream_cuts_total", module="switch", reason="max_duration")
    _r, body, took = stream(http)
    assert 0.9 < took < 2.0
    events = body.split(b"\n\n")
    assert events[0] == b"data: 0" and 7 <= len(events) <= 14
    assert events[-2].startswith(b"event: vx11-error\ndata: ") and events[-1] == b""
    assert "max_duration" in json.loads(events[-2].split(b"data: ", 1)[1])["detail"]
    # Counted as the stream's task ends, which may be just after the client read its end.
    assert wait_until(
        lambda: sample("vx11_stream_cuts_total", module="switch", reason="max_duration") == cuts + 1
    )
    assert breaker(http) == ("closed", 0)


def test_a_slow_to_start_then_steady_stream_is_not_cut(http, upstream, no_beats):
    """Its head comes after 2.5 × idle_timeout (the head's wait is the route's timeout),
    then it streams for longer than that timeout: before SPEC §20 the timeout bounded the
    whole exchange and cut it at 1.5 s."""
    Route.objects.create(intent="stream", timeout=1.5, idle_timeout=0.3)
    handler = script(*steady(20), head_after=0.75)
    upstream.route("POST", "/switch/task", handler, read_body=False)
    first_byte = sample("vx11_stream_first_byte_seconds_count", module="switch")
    durations = sample("vx11_stream_duration_seconds_sum", module="switch")
    r, body, took = stream(http)
    assert r.status_code == 200 and took > 2.5
    assert body == b"".join(f"data: {n}\n\n".encode() for n in range(20))
    assert sample("vx11_stream_first_byte_seconds_count", module="switch") == first_byte + 1
    assert wait_until(
        lambda: sample("vx11_stream_duration_seconds_sum", module="switch") - durations > 1.8
    )
    assert breaker(http) == ("closed", 0)


def test_the_head_wait_is_bounded_by_the_routes_timeout(http, upstream, no_beats):
    Route.objects.create(intent="stream", timeout=0.4, idle_timeout=5)
    upstream.route("POST", "/switch/task", script(b"data: 1\n\n", head_after=1.0), read_body=False)
    r = http.post("/vx11/route/stream", json={}, headers=H)
    assert r.status_code == 504 and r.json()["error"] == "upstream_timeout"


# --------------------------------------------------------------------------- one deadline


def test_a_non_streaming_route_keeps_its_one_deadline(gateway, upstream, gw_env):
    """``task`` (streaming off): its 1.5 s timeout still bounds the whole answer, body
    included, and its SSE answer gets no heartbeat (silent for longer than its period)."""
    gw_env.set(VX11_SSE_HEARTBEAT_SECONDS=1)
    Route.objects.create(intent="task", timeout=1.5)
    steps = (b"data: 0\n\n", 1.3, *steady(20))
    upstream.route("POST", "/switch/task", script(*steps), read_body=False)
    data, took = raw_exchange(gateway.port, "task")
    assert data.startswith(b"HTTP/1.1 200") and b"data: 0\n\n" in data
    assert not data.endswith(b"0\r\n\r\n") and b"keep-alive\n\n" not in data
    assert took < 2.5


# --------------------------------------------------------------------------- connect timeout


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A listening socket that never accepts, its queue full: a connect never completes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    yield port
    for sock in [*fillers, server]:
        sock.close()


def test_a_connect_takes_at_most_the_connect_timeout(http, gw_env, unaccepting_port):
    Route.objects.create(intent="task", timeout=20)
    gw_env.set(
        VX11_MODULE_SWITCH_URL=f"http://127.0.0.1:{unaccepting_port}",
        VX11_CONNECT_TIMEOUT=0.3,
        VX11_RETRY_MAX=0,
    )
    started = time.monotonic()
    r = http.post("/vx11/route/task", json={}, headers=H)
    took = time.monotonic() - started
    assert r.status_code == 503 and r.json()["error"] == "upstream_unavailable"
    assert "connect timed out" in r.json()["detail"]
    assert 0.25 < took < 2.0


def test_a_connect_timeout_longer_than_the_deadline_is_the_deadline(http, gw_env, unaccepting_port):
    Route.objects.create(intent="task", timeout=0.3)
    gw_env.set(VX11_MODULE_SWITCH_URL=f"http://127.0.0.1:{unaccepting_port}", VX11_RETRY_MAX=0)
    r = http.post("/vx11/route/task", json={}, headers=H)
    assert r.status_code == 504 and r.json()["error"] == "upstream_timeout"


# --------------------------------------------------------------------------- configuration


def test_stream_bounds_are_validated_everywhere(http, transactional_db):
    r = http.post(
        "/vx11/routes",
        json={"intent": "stream", "idle_timeout": 0.05, "max_duration": 0.5},
        headers=H,
    )
    assert r.status_code == 400
    assert set(r.json()["errors"]) >= {"idle_timeout", "max_duration"}
    r = http.post(
        "/vx11/routes",
        json={"intent": "stream", "idle_timeout": 20, "max_duration": 7200},
        headers=H,
    )
    assert r.status_code == 201, r.text
    effective = http.get("/vx11/routes/stream", headers=H).json()
    assert (effective["idle_timeout"], effective["max_duration"]) == (20, 7200)
    with pytest.raises(DocumentError) as raised:
        import_document({"routes": {"stream": {"idle_timeout": 4000, "max_duration": 0}}})
    joined = "\n".join(raised.value.errors)
    assert "routes.stream.idle_timeout: Idle timeout must be between 0.1 and 3600" in joined
    assert "routes.stream.max_duration: Max duration must be between 1 and 86400" in joined


def test_event_boundaries_are_found_across_chunks_and_line_ends():
    from gateway.edge.stream import _boundary

    tail = b"\n\n"
    seen = []
    for chunk in (b"data: a", b"\n", b"\n", b"data: b\r\n", b"\r\n", b"data: c\r", b"\r", b"x"):
        tail, at = _boundary(tail, chunk)
        seen.append(at)
    assert seen == [False, False, True, False, True, False, True, False]


def test_the_admin_form_edits_the_stream_bounds(admin_client):
    form = {"intent": "stream", "enabled": "on", "fallback_on": "", "fallbacks": ""}
    page = admin_client.get("/admin/gateway/route/add/").content.decode()
    assert 'name="idle_timeout"' in page and 'name="max_duration"' in page
    r = admin_client.post(
        "/admin/gateway/route/add/", {**form, "idle_timeout": "0.01", "max_duration": "99999"}
    )
    assert r.status_code == 200  # the form again, with its errors
    text = r.content.decode()
    assert "Idle timeout must be between 0.1 and 3600" in text
    assert "Max duration must be between 1 and 86400" in text
    r = admin_client.post("/admin/gateway/route/add/", {**form, "idle_timeout": "90"})
    assert r.status_code == 302, r.content[:2000]
    row = Route.objects.get(intent="stream")
    assert (row.idle_timeout, row.max_duration) == (90, None)
    page = admin_client.get(f"/admin/gateway/route/{row.pk}/change/").content.decode()
    assert "idle_timeout 60s, max_duration 3600s" in page  # the code default beside it


def test_the_stream_bounds_survive_export_then_import(transactional_db):
    from gateway.models import ConfigVersion
    from gateway.operations.config_doc import build_document, dump, parse

    Route.objects.create(intent="stream", idle_timeout=20, max_duration=7200)
    doc = parse(dump(build_document()))
    assert doc["routes"]["stream"] == {"idle_timeout": 20, "max_duration": 7200}
    before = ConfigVersion.read()
    assert import_document(doc).changes == []
    assert ConfigVersion.read() == before
    doc["routes"]["stream"]["idle_timeout"] = 30
    assert [str(c) for c in import_document(doc).changes] == ["changed route stream (idle_timeout)"]


def chunked_upload(port: int, intent: str) -> tuple[bytes, float]:
    """A chunked upload (sent through aiohttp, the streaming transport): the whole answer."""
    request = (
        f"POST /vx11/route/{intent} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-VX11-Token: "
        f"{OPERATOR_TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "1\r\n{\r\n"
    ).encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        time.sleep(0.1)  # the body in two messages: streamed upstream, not buffered
        sock.sendall(b"1\r\n}\r\n0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - started


def test_a_streamed_upload_gets_the_same_stream_bounds(gateway, upstream, no_beats):
    """The aiohttp transport: its deadline bounds the head only, idle still cuts."""
    Route.objects.create(intent="stream", timeout=1.5, idle_timeout=0.3)
    handler = script(*steady(20), head_after=0.75)
    upstream.route("POST", "/switch/task", handler, read_body=False)
    data, took = chunked_upload(gateway.port, "stream")
    assert data.startswith(b"HTTP/1.1 200") and took > 2.5
    assert data.endswith(b"0\r\n\r\n") and data.count(b"data: ") == 20
    upstream.route("POST", "/switch/task", script(b"data: 1\n\n", 1.2), read_body=False)
    data, took = chunked_upload(gateway.port, "stream")
    assert b"event: vx11-error" in data and data.endswith(b"0\r\n\r\n") and took < 1.0


# --------------------------------------------------------------------------- review fixes


def test_the_boundary_check_keeps_only_the_last_bytes_of_a_chunk():
    from gateway.edge.stream import _boundary

    tail, at = _boundary(b"\n\n", b"data: " + b"x" * 200_000 + b"\n\n")
    assert (tail, at) == (b"xx\n\n", True)  # four bytes, not the 200 KB chunk
    tail, at = _boundary(tail, b"da")
    assert (tail, at) == (b"\n\nda", False)


async def test_a_cut_during_a_heartbeat_write_ends_the_stream_like_any_cut(upstream, gw_env):
    """The module is silent, a heartbeat goes out to a client that reads nothing (its
    write blocks), and max_duration falls inside that write: the stream is cut
    (``StreamCut``, counted), not torn down by a stray ``CancelledError``."""
    from types import SimpleNamespace

    from gateway.edge.stream import HEARTBEAT, MAX_DURATION, StreamCut, pump
    from gateway.upstream import H1Transport, OutboundRequest

    gw_env.set(VX11_SSE_HEARTBEAT_SECONDS=1)
    upstream.route("GET", "/sse", script(b"data: 1\n\n", 4.0), read_body=False)
    route = SimpleNamespace(idle_timeout=10.0, max_duration=1.5, timeout=5.0)
    call = SimpleNamespace(  # the fields of a Call that pump reads
        route=route,
        module=SimpleNamespace(name="switch"),
        deadline=time.monotonic() + 5.0,
        request=SimpleNamespace(cid="beat-cut"),
    )
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:  # a client that stops reading
        body = message.get("body", b"")
        sent.append(body)
        if body == HEARTBEAT:
            await asyncio.sleep(10)

    async with H1Transport() as transport:
        request = OutboundRequest("GET", "/sse", [], None, 5.0, head_only=True)
        response = await transport.send(upstream.url, request)
        cuts = sample("vx11_stream_cuts_total", module="switch", reason="max_duration")
        started = time.monotonic()
        try:
            with pytest.raises(StreamCut) as cut:
                await pump(call, response, send, None, [])  # type: ignore[arg-type]
        finally:
            response.close()
    assert cut.value.reason == MAX_DURATION
    assert time.monotonic() - started > 1.3  # a lower bound only: load cannot break it
    assert sent[-1] == HEARTBEAT and b"data: 1\n\n" in sent
    assert sample("vx11_stream_cuts_total", module="switch", reason="max_duration") == cuts + 1


def target_requests(module: str, status: str) -> float:
    total = 0.0
    for family in REGISTRY.collect():
        for s in family.samples:
            labels = s.labels
            if s.name == "vx11_target_requests_total" and labels.get("module") == module:
                total += s.value if labels.get("status") == status else 0.0
    return total


def test_a_probe_settled_at_its_head_is_not_recorded_again_when_cut(http, upstream, gw_env):
    """A half-open probe's stream is settled at its head (200); a max_duration cut of
    that non-SSE stream is no news (not the module's failure): one outcome, not two."""
    gw_env.set(VX11_SSE_HEARTBEAT_SECONDS=0, VX11_RETRY_MAX=0, VX11_CB_RECOVERY_TIMEOUT="0.2")
    Route.objects.create(intent="stream", idle_timeout=5, max_duration=1)
    upstream.respond("POST", "/switch/task", status=503)
    for _ in range(3):
        assert http.post("/vx11/route/stream", json={}, headers=H).status_code == 503
    assert breaker(http)[0] == "open"
    chunks = script(*steady(30), content_type="application/octet-stream")
    upstream.route("POST", "/switch/task", chunks, read_body=False)
    time.sleep(0.3)  # open -> half-open
    before = target_requests("switch", "200")
    with pytest.raises(httpx.HTTPError):  # cut: an aborted body
        stream(http)
    assert breaker(http) == ("closed", 0)
    assert target_requests("switch", "200") == before + 1


@pytest.mark.parametrize("value", ["0.001", "0.5", "-1"])
def test_a_heartbeat_is_off_or_at_least_a_second(monkeypatch, value):
    from gateway.core.conf import GatewaySettings
    from vx11site.env import EnvError

    knob = GatewaySettings.sse_heartbeat_seconds
    for fine in ("0", "1", "15"):
        monkeypatch.setenv("VX11_SSE_HEARTBEAT_SECONDS", fine)
        assert knob.read() == float(fine)
    monkeypatch.setenv("VX11_SSE_HEARTBEAT_SECONDS", value)
    with pytest.raises(EnvError, match="VX11_SSE_HEARTBEAT_SECONDS must be"):
        knob.read()
