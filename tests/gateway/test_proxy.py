"""The intent proxy end to end: a live gateway in front of a real upstream server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
from aiohttp import web

from gateway.models import Route
from tests.conftest import GATEWAY_TOKEN, OPERATOR_TOKEN
from tests.servers import free_port


def test_chat_reaches_switch_with_gateway_headers(http, upstream, operator_headers):
    r = http.post("/vx11/route/task?lang=es", json={"prompt": "hi"}, headers=operator_headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-intent"] == "task"
    assert r.headers["x-vx11-module"] == "switch"
    assert r.headers["x-correlation-id"]
    seen = upstream.seen[-1]
    assert (seen.method, seen.path, seen.query) == ("POST", "/switch/task", "lang=es")
    assert seen.json() == {"prompt": "hi"}
    assert r.json()["echo"] == {"prompt": "hi"}


def test_bearer_token_is_accepted(http):
    r = http.post(
        "/vx11/route/task", json={}, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    )
    assert r.status_code == 200


def test_missing_token_is_401_with_www_authenticate(http, upstream):
    r = http.post("/vx11/route/task", json={})
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    assert body["error"] == "auth_required" and body["status"] == 401
    assert body["correlation_id"] == r.headers["x-correlation-id"]
    assert upstream.seen == []


def test_wrong_token_is_403(http, upstream):
    r = http.post("/vx11/route/task", json={}, headers={"X-VX11-Token": "nope"})
    assert r.status_code == 403
    assert r.json()["error"] == "forbidden"
    assert upstream.seen == []


def test_api_client_token_works_and_revocation_takes_effect(http, make_client):
    client, token = make_client("robot")
    assert (
        http.post("/vx11/route/task", json={}, headers={"X-VX11-Token": token}).status_code == 200
    )
    client.active = False
    client.save()
    assert (
        http.post("/vx11/route/task", json={}, headers={"X-VX11-Token": token}).status_code == 403
    )


def test_unknown_intent_is_404_but_only_after_auth(http, operator_headers):
    assert http.post("/vx11/route/nope", json={}).status_code == 401
    r = http.post("/vx11/route/nope", json={}, headers=operator_headers)
    assert r.status_code == 404
    assert r.json()["error"] == "unknown_intent"


def test_disabled_intent_answers_unknown_intent(http, operator_headers):
    Route.objects.create(intent="task", enabled=False)
    r = http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert r.status_code == 404 and r.json()["error"] == "unknown_intent"


def test_get_on_intent_is_405(http, operator_headers):
    r = http.get("/vx11/route/task", headers=operator_headers)
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json()["error"] == "method_not_allowed"


def test_public_route_needs_no_token(http, upstream):
    Route.objects.create(
        intent="ping", module="madre", endpoint="/ping", method="GET", auth_required=False
    )
    r = http.post("/vx11/route/ping")
    assert r.status_code == 200, r.text
    assert upstream.seen[-1].method == "GET" and upstream.seen[-1].path == "/ping"


def test_gateway_credentials_are_never_forwarded(http, upstream):
    http.post(
        "/vx11/route/task",
        json={},
        headers={
            "X-VX11-Token": OPERATOR_TOKEN,
            "X-VX11-GW-Token": GATEWAY_TOKEN,
            "Authorization": f"Bearer {OPERATOR_TOKEN}",
        },
    )
    http.post("/vx11/route/task", json={}, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    for seen in upstream.seen:
        lowered = {k.lower(): v for k, v in seen.headers.items()}
        assert "x-vx11-token" not in lowered
        assert "x-vx11-gw-token" not in lowered
        assert "authorization" not in lowered
        assert OPERATOR_TOKEN not in str(seen.headers)


def test_hop_by_hop_headers_are_dropped_both_ways(http, upstream, operator_headers):
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {},
            headers={
                "Connection": "X-Secret",
                "X-Secret": "1",
                "Keep-Alive": "timeout=5",
                "X-Kept": "yes",
            },
        )

    upstream.route("POST", "/switch/task", answer)
    r = http.post(
        "/vx11/route/task",
        json={},
        headers={
            **operator_headers,
            "Connection": "X-Hop",
            "X-Hop": "1",
            "TE": "trailers",
            "X-Pass": "through",
        },
    )
    seen = {k.lower(): v for k, v in upstream.seen[-1].headers.items()}
    assert "x-hop" not in seen and "te" not in seen
    assert seen["x-pass"] == "through"
    assert "x-secret" not in r.headers and "keep-alive" not in r.headers
    assert r.headers["x-kept"] == "yes"


def test_correlation_id_is_kept_when_valid_and_replaced_when_not(http, upstream, operator_headers):
    r = http.post(
        "/vx11/route/task", json={}, headers={**operator_headers, "X-Correlation-ID": "abc-123:x.y"}
    )
    assert r.headers["x-correlation-id"] == "abc-123:x.y"
    assert upstream.seen[-1].headers["X-Correlation-ID"] == "abc-123:x.y"
    r = http.post(
        "/vx11/route/task", json={}, headers={**operator_headers, "X-Correlation-ID": "bad id!" * 3}
    )
    assert r.headers["x-correlation-id"] != "bad id!" * 3
    assert len(r.headers["x-correlation-id"]) == 36
    r = http.post(
        "/vx11/route/task", json={}, headers={**operator_headers, "X-Request-ID": "req-7"}
    )
    assert r.headers["x-correlation-id"] == "req-7"


def test_traceparent_valid_is_propagated_invalid_dropped(http, upstream, operator_headers):
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    http.post(
        "/vx11/route/task",
        json={},
        headers={**operator_headers, "traceparent": good, "tracestate": "vx=1"},
    )
    assert upstream.seen[-1].headers["traceparent"] == good
    assert upstream.seen[-1].headers["tracestate"] == "vx=1"
    http.post("/vx11/route/task", json={}, headers={**operator_headers, "traceparent": "zz"})
    assert "traceparent" not in {k.lower() for k in upstream.seen[-1].headers}


def test_forwarded_headers_distrust_client_xff_by_default(http, upstream, operator_headers):
    http.post(
        "/vx11/route/task", json={}, headers={**operator_headers, "X-Forwarded-For": "6.6.6.6"}
    )
    seen = upstream.seen[-1].headers
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-By"] == "vx11-gateway"
    assert seen["X-Forwarded-Host"].startswith("127.0.0.1:")


def test_forwarded_for_is_extended_from_a_trusted_proxy(http, upstream, gw_env, operator_headers):
    gw_env.set(VX11_TRUSTED_PROXIES="127.0.0.0/8")
    http.post(
        "/vx11/route/task",
        json={},
        headers={**operator_headers, "X-Forwarded-For": "6.6.6.6, 10.0.0.1"},
    )
    assert upstream.seen[-1].headers["X-Forwarded-For"] == "6.6.6.6, 10.0.0.1, 127.0.0.1"


def test_upstream_error_answers_pass_through_unchanged(http, upstream, operator_headers):
    upstream.respond(
        "POST", "/switch/task", status=418, body=b"teapot", headers={"Content-Type": "text/x-tea"}
    )
    r = http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert (r.status_code, r.content, r.headers["content-type"]) == (418, b"teapot", "text/x-tea")
    upstream.respond("POST", "/switch/task", status=500, body={"boom": True})
    r = http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert r.status_code == 500 and r.json() == {"boom": True}


def test_route_timeout_is_504(http, upstream, operator_headers):
    Route.objects.create(intent="task", timeout=0.3)
    upstream.respond("POST", "/switch/task", delay=2.0)
    r = http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout"


def test_connect_failure_is_503_upstream_unavailable(http, gw_env, operator_headers):
    gw_env.set(VX11_MODULE_SWITCH_URL=f"http://127.0.0.1:{free_port()}")
    r = http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert r.status_code == 503
    assert r.json()["error"] == "upstream_unavailable"


@pytest.fixture
def garbage_server():
    """A TCP server that answers every request with bytes that are not HTTP."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.recv(65536)
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(2)
    sock.close()


def test_invalid_upstream_answer_is_502(http, gw_env, garbage_server, operator_headers):
    gw_env.set(VX11_MODULE_SWITCH_URL=garbage_server)
    r = http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert r.status_code == 502
    assert r.json()["error"] == "bad_gateway"


def test_body_over_the_limit_is_413_without_reaching_upstream(
    http, upstream, gw_env, operator_headers
):
    gw_env.set(VX11_MAX_BODY_BYTES=1000)
    r = http.post("/vx11/route/task", content=b"x" * 2000, headers=operator_headers)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    def chunks():
        for _ in range(10):
            yield b"y" * 500

    r = http.post("/vx11/route/task", content=chunks(), headers=operator_headers)
    assert r.status_code == 413
    assert all(len(s.body) <= 1000 for s in upstream.seen)


def test_malformed_content_length_is_400(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port)) as s:
        s.sendall(
            b"POST /vx11/route/task HTTP/1.1\r\nHost: x\r\nX-VX11-Token: "
            + OPERATOR_TOKEN.encode()
            + b"\r\nContent-Length: abc\r\n\r\n"
        )
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400")


def test_big_upload_streams_through_intact(http, upstream, operator_headers):
    payload = bytes(range(256)) * 20000  # 5 MB
    r = http.post("/vx11/route/task", content=payload, headers=operator_headers)
    assert r.status_code == 200
    assert upstream.seen[-1].body == payload


async def test_stream_intent_delivers_first_chunk_before_upstream_finishes(gateway, upstream):
    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.4)
        await response.write_eof()
        return response

    upstream.route("POST", "/switch/task", slow_stream)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        start = time.monotonic()
        async with client.stream(
            "POST", "/vx11/route/stream", json={}, headers={"X-VX11-Token": OPERATOR_TOKEN}
        ) as r:
            assert r.headers["content-type"] == "text/event-stream"
            chunks = []
            async for chunk in r.aiter_raw():
                chunks.append((time.monotonic() - start, chunk))
    assert b"".join(c for _, c in chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    first_at, total = chunks[0][0], chunks[-1][0]
    assert first_at < total - 0.5  # the first chunk came while the upstream was still writing


def test_unexpected_error_is_a_500_problem_with_correlation_id(http, operator_headers, monkeypatch):
    from gateway.edge import pipeline

    async def explode(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(pipeline, "handle", explode)
    r = http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal_error"
    assert "kaboom" not in r.text and "Traceback" not in r.text
    assert body["correlation_id"] == r.headers["x-correlation-id"]


def test_query_string_reaches_upstream_byte_for_byte(http, upstream, operator_headers):
    http.post(
        "/vx11/route/task?path=a%2Fb&dot=%2e&sp=x+y&u=%C3%A9", json={}, headers=operator_headers
    )
    assert upstream.seen[-1].query == "path=a%2Fb&dot=%2e&sp=x+y&u=%C3%A9"
