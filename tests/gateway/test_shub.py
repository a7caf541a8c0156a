"""The /shub proxy and its health cache, end to end through the live gateway (SPEC §9)."""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import io
import json
import os
import socket
import tempfile
import threading
import time
from typing import Any

import httpx
import pytest
from aiohttp import web
from channels.testing import HttpCommunicator, WebsocketCommunicator
from django.core.management import call_command

from tests.conftest import GATEWAY_TOKEN, OPERATOR_TOKEN
from tests.servers import GatewayProcess, free_port, fresh_database_url

GW = {"X-VX11-GW-Token": GATEWAY_TOKEN}
MB = 1024 * 1024


def shub_paths(upstream: Any, path: str) -> list[Any]:
    return [s for s in upstream.seen if s.path == path]


# --------------------------------------------------------------------------- raw HTTP


def raw_request(
    port: int, method: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange over a socket: the target goes on the wire exactly as given."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    if found.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(status_line.split(" ")[1]), found, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


# --------------------------------------------------------------------------- access


@pytest.mark.parametrize("path", ["/shub/health", "/shub/ready", "/shub/openapi.json"])
def test_public_paths_need_no_token_and_ignore_a_wrong_one(http, upstream, path):
    r = http.get(path)
    assert r.status_code == 200, r.text
    assert upstream.seen[-1].path == path.removeprefix("/shub")
    r = http.get(path, headers={"X-VX11-GW-Token": "wrong", "X-VX11-Token": "wrong"})
    assert r.status_code == 200


def test_protected_path_without_gateway_token_is_401(http, upstream):
    r = http.get("/shub/files/1")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"] == "auth_required"
    assert upstream.seen == []


def test_protected_path_with_wrong_gateway_token_is_403(http, upstream):
    r = http.get("/shub/files/1", headers={"X-VX11-GW-Token": "not-the-token"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    # A valid *client* token is not the gateway token.
    r = http.get("/shub/files/1", headers={"X-VX11-Token": OPERATOR_TOKEN})
    assert r.status_code == 401
    assert upstream.seen == []


def test_gateway_token_opens_protected_paths(http, upstream):
    r = http.get("/shub/files/1", headers=GW)
    assert r.status_code == 200
    assert r.headers["x-vx11-module"] == "shub"
    assert upstream.seen[-1].path == "/files/1"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
def test_every_method_is_forwarded_with_prefix_stripped_and_query_kept(http, upstream, method):
    r = http.request(method, "/shub/items/7?x=1&y=two%20words", headers=GW)
    assert r.status_code == 200, r.text
    seen = upstream.seen[-1]
    assert (seen.method, seen.path, seen.query) == (method, "/items/7", "x=1&y=two%20words")


def test_prefix_is_kept_when_stripping_is_off(http, upstream, gw_env):
    gw_env.set(VX11_SHUB_STRIP_PREFIX="false")
    assert http.get("/shub/items/7", headers=GW).status_code == 200
    assert upstream.seen[-1].path == "/shub/items/7"


def test_request_body_reaches_shub_unchanged(http, upstream):
    r = http.post("/shub/upload?kind=raw", content=b"\x00\x01binary\xff", headers=GW)
    assert r.status_code == 200
    assert upstream.seen[-1].body == b"\x00\x01binary\xff"


def test_gateway_credentials_never_reach_shub(http, upstream):
    http.post(
        "/shub/files",
        json={},
        headers={**GW, "X-VX11-Token": OPERATOR_TOKEN, "X-Other": "kept"},
    )
    http.get("/shub/health", headers={"X-VX11-GW-Token": GATEWAY_TOKEN})
    assert len(upstream.seen) == 2
    for seen in upstream.seen:
        lowered = {k.lower(): v for k, v in seen.headers.items()}
        assert "x-vx11-gw-token" not in lowered
        assert "x-vx11-token" not in lowered
        assert GATEWAY_TOKEN not in str(seen.headers)
        assert OPERATOR_TOKEN not in str(seen.headers)
    assert {k.lower(): v for k, v in upstream.seen[0].headers.items()}["x-other"] == "kept"


# --------------------------------------------------------------------------- paths


TRAVERSALS = [
    "/shub/../admin",
    "/shub/files/../../etc/passwd",
    "/shub/./files",
    "/shub/files/..",
    "/shub/%2e%2e/admin",
    "/shub/%2E%2E/admin",
    "/shub/.%2e/admin",
    "/shub/files/%2e%2e%2f%2e%2e%2fetc",
    "/shub/files%2f..%2fadmin",
    "/shub/files%2Fsecret",
    "/shub/files\\..\\admin",
    "/shub/files%5c..%5cadmin",
    "/shub/files%5Csecret",
    "/shub/files%00.json",
    "/shub/files/%0d%0aX-Injected:%201",
    "/shub/files%09tab",
    "/shub/%252e%252e/admin",
    "/shub/%25252e%25252e/admin",
    "/shub/files%252fsecret",
    "/shub/files%255csecret",
    "/shub/files%2500.json",
    "/shub/%2525252e%2525252e/admin",
    "/shub//etc/passwd",
    # path parameters hiding dot or empty segments (Tomcat and Spring read "..;x" as "..")
    "/shub/..;/admin",
    "/shub/files/..;x=1/admin",
    "/shub/files/.;/secret",
    "/shub/%2e%2e;/admin",
    "/shub/files/..%3b/admin",
    "/shub/files/;x/admin",
    # the prefix itself percent-encoded: refused, never stripped by five raw characters
    "/%73hub/files/1",
    "/%73hub/health",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_traversal_and_control_characters_are_refused_before_shub(gateway, upstream, target):
    status, headers, body = raw_request(gateway.port, "GET", target, GW)
    assert status == 400, (target, body)
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["error"] == "invalid_request"
    assert upstream.seen == []


def test_traversal_is_refused_on_public_paths_and_without_token_too(gateway, upstream):
    for target in ("/shub/health/..", "/shub/%2e%2e/health", "/shub/health%00"):
        status, _, body = raw_request(gateway.port, "GET", target)
        assert status == 400, (target, body)
    assert upstream.seen == []


def test_harmless_percent_encoding_passes_as_sent(gateway, upstream):
    raw_paths: list[str] = []

    async def record_raw(request: web.Request) -> web.Response:
        raw_paths.append(request.raw_path)
        return web.json_response({})

    upstream.default = record_raw
    target = "/shub/files/a%20b/100%25?q=a%26b%3Dc&e=%20"
    status, _, body = raw_request(gateway.port, "GET", target, GW)
    assert status == 200, body
    assert raw_paths == ["/files/a%20b/100%25?q=a%26b%3Dc&e=%20"]


# --------------------------------------------------------------------------- headers


def test_hop_by_hop_headers_are_dropped_both_ways(http, upstream):
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {},
            headers={
                "Connection": "X-Secret",
                "X-Secret": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-Kept": "yes",
            },
        )

    upstream.route("GET", "/files/1", answer)
    r = http.get(
        "/shub/files/1",
        headers={
            **GW,
            "Connection": "X-Hop",
            "X-Hop": "1",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "Upgrade": "websocket",
            "X-Pass": "through",
        },
    )
    assert r.status_code == 200
    seen = {k.lower(): v for k, v in upstream.seen[-1].headers.items()}
    for name in ("x-hop", "te", "proxy-authorization", "upgrade"):
        assert name not in seen, name
    assert seen["x-pass"] == "through"
    for name in ("x-secret", "keep-alive", "proxy-authenticate"):
        assert name not in r.headers, name
    assert r.headers["x-kept"] == "yes"


def test_gzip_answer_passes_through_untouched(http, upstream):
    raw = gzip.compress(b"shub says hello " * 200)
    upstream.respond(
        "GET",
        "/files/report",
        body=raw,
        headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
    )
    with http.stream("GET", "/shub/files/report", headers={**GW, "Accept-Encoding": "gzip"}) as r:
        wire = b"".join(r.iter_raw())
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert wire == raw
    assert upstream.seen[-1].headers["Accept-Encoding"] == "gzip"


def test_gzip_request_body_reaches_shub_with_its_encoding(http, upstream):
    raw = gzip.compress(b'{"a": 1}')
    r = http.post(
        "/shub/files",
        content=raw,
        headers={**GW, "Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200
    seen = {k.lower(): v for k, v in upstream.seen[-1].headers.items()}
    # aiohttp inflates request bodies itself: the gzip header arrived with the very
    # bytes sent (same length) and they inflate to the original document.
    assert seen["content-encoding"] == "gzip"
    assert seen["content-length"] == str(len(raw))
    assert upstream.seen[-1].body == b'{"a": 1}'


def test_cached_gzip_health_keeps_bytes_and_encoding(http, upstream):
    raw = gzip.compress(b'{"status": "ok"}')
    upstream.respond(
        "GET",
        "/health",
        body=raw,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    for expected in ("MISS", "HIT"):
        with http.stream("GET", "/shub/health") as r:
            wire = b"".join(r.iter_raw())
        assert r.headers["x-cache"] == expected
        assert r.headers["content-encoding"] == "gzip"
        assert wire == raw


# --------------------------------------------------------------------------- failures


def test_shub_down_is_503_shub_unavailable(http, gw_env):
    gw_env.set(VX11_MODULE_SHUB_URL=f"http://127.0.0.1:{free_port()}", VX11_RETRY_MAX=0)
    r = http.get("/shub/files/1", headers=GW)
    assert r.status_code == 503
    body = r.json()
    assert body["error"] == "shub_unavailable" and body["status"] == 503
    r = http.post("/shub/files", json={}, headers=GW)
    assert r.status_code == 503 and r.json()["error"] == "shub_unavailable"


def test_shub_timeout_is_504(http, upstream, gw_env):
    gw_env.set(VX11_SHUB_TIMEOUT=0.3)
    upstream.respond("POST", "/slow", delay=3.0)
    r = http.post("/shub/slow", json={}, headers=GW)
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout"


def test_small_idempotent_bodies_are_replayed_on_retry(http, upstream):
    calls: list[bytes] = []

    async def flaky(request: web.Request) -> web.Response:
        calls.append(await request.read())
        if len(calls) == 1:
            return web.json_response({"busy": True}, status=503)
        return web.json_response({"ok": True})

    upstream.route("PUT", "/files/1", flaky)

    r = http.put("/shub/files/1", content=b"part-one;part-two", headers=GW)
    assert r.status_code == 200 and r.headers["x-vx11-attempts"] == "2"
    assert calls == [b"part-one;part-two"] * 2

    # A large body of unknown size is streamed once, not buffered for a retry.
    def chunks():
        for _ in range(32):
            yield b"z" * CHUNK

    calls.clear()
    r = http.put("/shub/files/1", content=chunks(), headers=GW)
    assert r.status_code == 503 and r.headers["x-vx11-attempts"] == "1"
    assert calls == [b"z" * CHUNK * 32]


def test_shub_error_answers_pass_through(http, upstream):
    upstream.respond("GET", "/files/x", status=404, body={"detail": "no such file"})
    r = http.get("/shub/files/x", headers=GW)
    assert r.status_code == 404 and r.json() == {"detail": "no such file"}


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Samples this process's RSS while a transfer runs (gateway, upstream and client all
    live in it); ``growth`` is the highest sample above the starting point."""

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


CHUNK = 64 * 1024
BIG = 50 * MB


@pytest.mark.parametrize("method", ["POST", "PUT"])  # PUT is retryable: still not buffered
def test_50mb_upload_streams_through_in_bounded_memory(http, upstream, gw_env, method):
    gw_env.set(VX11_MAX_BODY_BYTES=60 * MB)
    block = bytes(range(256)) * (CHUNK // 256)

    async def sink(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    upstream.route(method, "/sink", sink, read_body=False)
    expected = hashlib.sha256()
    for _ in range(BIG // CHUNK):
        expected.update(block)

    def body():
        for _ in range(BIG // CHUNK):
            yield block

    http.request(method, "/shub/sink", content=b"warm", headers=GW)  # pools and code paths warmed
    with PeakRss() as rss:
        r = http.request(method, "/shub/sink", content=body(), headers=GW, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"size": BIG, "sha256": expected.hexdigest()}
    assert rss.growth < 30 * MB, f"RSS grew by {rss.growth / MB:.1f} MB"


def test_50mb_download_streams_through_in_bounded_memory(http, upstream):
    block = bytes(range(256)) * (CHUNK // 256)

    async def blob(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = BIG
        await response.prepare(request)
        for _ in range(BIG // CHUNK):
            await response.write(block)
        await response.write_eof()
        return response

    upstream.route("GET", "/blob", blob)
    expected = hashlib.sha256()
    for _ in range(BIG // CHUNK):
        expected.update(block)
    http.get("/shub/files/1", headers=GW)  # warm
    digest = hashlib.sha256()
    size = 0
    with PeakRss() as rss, http.stream("GET", "/shub/blob", headers=GW, timeout=60) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    assert (size, digest.hexdigest()) == (BIG, expected.hexdigest())
    assert rss.growth < 30 * MB, f"RSS grew by {rss.growth / MB:.1f} MB"


# --------------------------------------------------------------------------- health cache


def test_health_is_a_miss_then_a_hit(http, upstream):
    upstream.respond("GET", "/health", body={"status": "ok", "n": 1})
    first = http.get("/shub/health")
    assert first.status_code == 200
    assert first.headers["cache-status"] == "vx11-gateway; fwd=miss; stored"
    assert first.headers["x-cache"] == "MISS"
    second = http.get("/shub/health")
    assert second.status_code == 200
    assert second.headers["x-cache"] == "HIT"
    prefix, ttl = second.headers["cache-status"].rsplit("=", 1)
    assert prefix == "vx11-gateway; hit; ttl"
    assert 0 < int(ttl) <= 60
    assert second.json() == first.json() == {"status": "ok", "n": 1}
    assert second.headers["content-type"] == first.headers["content-type"]
    assert len(shub_paths(upstream, "/health")) == 1


def test_ready_is_cached_separately_from_health(http, upstream):
    upstream.respond("GET", "/ready", body={"ready": True})
    assert http.get("/shub/health").headers["x-cache"] == "MISS"
    assert http.get("/shub/ready").headers["x-cache"] == "MISS"
    assert http.get("/shub/ready").headers["x-cache"] == "HIT"
    assert http.get("/shub/ready").json() == {"ready": True}


def test_ttl_comes_from_the_setting(http, upstream, gw_env):
    gw_env.set(VX11_CACHE_TTL_HEALTH=5)
    http.get("/shub/health")
    ttl = int(http.get("/shub/health").headers["cache-status"].rsplit("=", 1)[1])
    assert 0 < ttl <= 5


def test_other_paths_and_methods_are_never_cached(http, upstream):
    for _ in range(2):
        r = http.get("/shub/files/1", headers=GW)
        assert "x-cache" not in r.headers and "cache-status" not in r.headers
        r = http.post("/shub/health", json={})
        assert "x-cache" not in r.headers
    assert len(upstream.seen) == 4


def test_server_errors_are_not_cached(http, upstream):
    upstream.respond("GET", "/health", status=500, body={"status": "down"})
    for _ in range(2):
        r = http.get("/shub/health")
        assert r.status_code == 500 and r.json() == {"status": "down"}
        assert r.headers["x-cache"] == "MISS"
        assert r.headers["cache-status"] == "vx11-gateway; fwd=miss"
    assert len(shub_paths(upstream, "/health")) == 2
    upstream.respond("GET", "/health", body={"status": "ok"})
    assert http.get("/shub/health").headers["cache-status"].endswith("stored")
    assert http.get("/shub/health").headers["x-cache"] == "HIT"


def test_cache_off_sends_every_call_upstream(http, upstream, gw_env):
    gw_env.set(VX11_CACHE_ENABLED="false")
    for _ in range(3):
        r = http.get("/shub/health")
        assert r.status_code == 200
        assert "x-cache" not in r.headers and "cache-status" not in r.headers
    assert len(shub_paths(upstream, "/health")) == 3


async def test_concurrent_misses_make_one_upstream_call(gateway, upstream):
    upstream.respond("GET", "/health", body={"status": "ok"}, delay=0.3)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        answers = await asyncio.gather(*(client.get("/shub/health") for _ in range(20)))
    assert [r.status_code for r in answers] == [200] * 20
    assert all(r.json() == {"status": "ok"} for r in answers)
    assert len(shub_paths(upstream, "/health")) == 1


@pytest.fixture
def two_gateways(redis_url, upstream):
    workdir = tempfile.mkdtemp(prefix="vx11-shub-")
    env = {
        "DATABASE_URL": fresh_database_url(os.environ.get("DATABASE_URL"), workdir),
        "VX11_REDIS_URL": redis_url,
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "VX11_VAR_DIR": workdir,
        "VX11_MODULE_SHUB_URL": upstream.url,
    }
    GatewayProcess.migrate(env)
    a, b = GatewayProcess(env).start(), GatewayProcess(env).start()
    yield a, b
    a.stop()
    b.stop()


@pytest.mark.reliability
async def test_concurrent_misses_across_two_processes_make_one_upstream_call(
    two_gateways, upstream
):
    a, b = two_gateways
    upstream.respond("GET", "/health", body={"status": "ok"}, delay=0.5)
    async with httpx.AsyncClient(timeout=10) as client:
        answers = await asyncio.gather(
            *(client.get((a if i % 2 else b).url + "/shub/health") for i in range(20))
        )
    assert [r.status_code for r in answers] == [200] * 20
    assert len(shub_paths(upstream, "/health")) == 1
    # One process fetched and stored; the other saw the stored answer.
    assert sum(r.headers["x-cache"] == "MISS" for r in answers) >= 1
    assert sum(r.headers["x-cache"] == "HIT" for r in answers) >= 1


@pytest.mark.reliability
def test_clear_reaches_every_process_through_redis(two_gateways, upstream, redis_url, gw_env):
    a, b = two_gateways
    with httpx.Client(timeout=10) as client:
        assert client.get(a.url + "/shub/health").headers["x-cache"] == "MISS"
        assert client.get(b.url + "/shub/health").headers["x-cache"] == "HIT"
        r = client.post(a.url + "/shub/cache/clear", headers=GW)
        assert r.status_code == 200 and r.json()["keys_deleted"] >= 1
        assert client.get(b.url + "/shub/health").headers["x-cache"] == "MISS"
        assert client.get(a.url + "/shub/health").headers["x-cache"] == "HIT"
        # The command, run against the same Redis, clears it too.
        gw_env.set(VX11_REDIS_URL=redis_url)
        out = io.StringIO()
        call_command("clear_gateway_cache", stdout=out)
        assert "1 key(s) deleted" in out.getvalue()
        assert client.get(a.url + "/shub/health").headers["x-cache"] == "MISS"
    assert len(shub_paths(upstream, "/health")) == 3


# --------------------------------------------------------------------------- cache clear


def test_cache_clear_needs_the_gateway_token(http):
    r = http.post("/shub/cache/clear")
    assert r.status_code == 401
    assert r.json()["error"] == "auth_required"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = http.post("/shub/cache/clear", headers={"X-VX11-GW-Token": "wrong"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    # A client token is not the gateway token.
    r = http.post("/shub/cache/clear", headers={"X-VX11-Token": OPERATOR_TOKEN})
    assert r.status_code == 401


def test_cache_clear_empties_the_cache_the_proxy_serves(http, upstream):
    http.get("/shub/health")
    http.get("/shub/ready")
    assert http.get("/shub/health").headers["x-cache"] == "HIT"
    before = time.time()
    r = http.post("/shub/cache/clear", headers=GW)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "cleared"
    assert body["keys_deleted"] == 2
    assert before <= body["timestamp"] <= time.time()
    assert http.get("/shub/health").headers["x-cache"] == "MISS"
    assert http.post("/shub/cache/clear", headers=GW).json()["keys_deleted"] == 1
    assert http.post("/shub/cache/clear", headers=GW).json()["keys_deleted"] == 0


def test_cache_clear_is_post_only(http):
    r = http.get("/shub/cache/clear", headers=GW)
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json()["error"] == "method_not_allowed"


def test_clear_command_empties_the_cache_and_prints_the_count(http, upstream):
    http.get("/shub/health")
    assert http.get("/shub/health").headers["x-cache"] == "HIT"
    out = io.StringIO()
    call_command("clear_gateway_cache", stdout=out, stderr=io.StringIO())
    assert out.getvalue().strip().endswith("1 key(s) deleted.")
    assert http.get("/shub/health").headers["x-cache"] == "MISS"


def test_admin_button_clears_the_cache(http, upstream, admin_client):
    http.get("/shub/health")
    assert http.get("/shub/health").headers["x-cache"] == "HIT"
    listing = admin_client.get("/admin/gateway/modulehealth/")
    assert listing.status_code == 200
    assert b'id="cache-clear-button"' in listing.content
    page = admin_client.get("/admin/gateway/modulehealth/clear-cache/")
    assert page.status_code == 200 and b"cache-clear-form" in page.content
    done = admin_client.post("/admin/gateway/modulehealth/clear-cache/", follow=True)
    assert done.status_code == 200
    assert b"1 key(s) deleted" in done.content
    assert http.get("/shub/health").headers["x-cache"] == "MISS"


def test_admin_clear_page_is_for_staff_only(client, db):
    r = client.get("/admin/gateway/modulehealth/clear-cache/")
    assert r.status_code == 302 and "/admin/login/" in r["Location"]
    r = client.post("/admin/gateway/modulehealth/clear-cache/")
    assert r.status_code in (302, 403)


@pytest.mark.django_db(transaction=True)
async def test_cache_clear_is_announced_on_the_event_stream(gw_env):
    from gateway.operations import registry as services
    from vx11site.asgi import application

    services.reset()
    ws = WebsocketCommunicator(
        application, "/ws/events", headers=[(b"x-vx11-token", OPERATOR_TOKEN.encode())]
    )
    connected, _ = await ws.connect(timeout=5)
    assert connected
    assert (await ws.receive_json_from(timeout=5))["type"] == "snapshot"
    clear = HttpCommunicator(
        application,
        "POST",
        "/shub/cache/clear",
        headers=[(b"x-vx11-gw-token", GATEWAY_TOKEN.encode()), (b"host", b"127.0.0.1")],
    )
    answer = await clear.get_response(timeout=5)
    assert answer["status"] == 200, answer
    event = await ws.receive_json_from(timeout=5)
    assert event["type"] == "cache.cleared"
    assert event["keys_deleted"] == json.loads(answer["body"])["keys_deleted"]
    await ws.disconnect()
