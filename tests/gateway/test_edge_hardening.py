"""The client-facing edge of the proxy paths (issue #12 items 2, 4, 6, 7, 8, 13; SPEC §2, §3, §9).

The proxy paths bypass Django's middleware, so the gateway applies ``ALLOWED_HOSTS``,
keeps its own cookies and headers to itself and reads ``X-Forwarded-*`` itself. Tests go
through real servers: the in-process live gateway (uvicorn h11), and for what depends on
the production HTTP parser (httptools) a gateway in its own process.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import GATEWAY_TOKEN, OPERATOR_TOKEN
from tests.servers import ROOT, GatewayProcess, free_port, fresh_database_url

GW = {"X-VX11-GW-Token": GATEWAY_TOKEN}
OP = {"X-VX11-Token": OPERATOR_TOKEN}


# --------------------------------------------------------------------------- raw sockets


def raw_exchange(
    port: int, head: list[str], body: bytes = b""
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request whose header lines go on the wire exactly as given (duplicates too)."""
    data = ("\r\n".join([*head, "Connection: close"]) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    top, _, rest = received.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = [(n.strip().lower(), v.strip()) for n, _, v in (li.partition(":") for li in lines)]
    return int(status_line.split(" ")[1]), headers, rest


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n == name]


class KeptAlive:
    """A raw client connection that sends several requests in turn (h11 frames the answers)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h11.Connection(h11.CLIENT)

    def get(self, target: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        wire = [("Host", "127.0.0.1"), *headers.items()]
        self.sock.sendall(self.conn.send(h11.Request(method="GET", target=target, headers=wire)))
        self.sock.sendall(self.conn.send(h11.EndOfMessage()))
        response: h11.Response | None = None
        body = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionResetError("the gateway closed the kept-alive connection")
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert response is not None
        found = {k.decode().lower(): v.decode() for k, v in response.headers}
        return response.status_code, found, body

    def close(self) -> None:
        self.sock.close()


class RawUpstream:
    """A module written against sockets: scripted answer bytes per path, keep-alive."""

    def __init__(self) -> None:
        self.port = free_port()
        self.answers: dict[str, bytes] = {}
        self.seen: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.thread = threading.Thread(target=self._accept, daemon=True, name="raw-upstream")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                size = int(length.group(1)) if length else 0
                while len(buffer) < size:
                    buffer += conn.recv(65536)
                buffer = buffer[size:]
                path = head.split(b" ")[1].decode("latin-1")
                self.seen.append(path)
                conn.sendall(
                    self.answers.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                )

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    server = RawUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def process_gateway(raw_upstream: RawUpstream) -> Iterator[GatewayProcess]:
    """The production stack (uvicorn + httptools, ``server_command``) in its own process."""
    workdir = tempfile.mkdtemp(prefix="vx11-edge-")
    env = {
        "DATABASE_URL": fresh_database_url(None, workdir),
        "VX11_VAR_DIR": workdir,
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "VX11_MODULE_SHUB_URL": raw_upstream.url,
        "VX11_REDIS_URL": "",
    }
    GatewayProcess.migrate(env)
    server = GatewayProcess(env).start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- item 2: cookies


def test_gateway_session_and_csrf_cookies_never_reach_the_module(gateway, upstream):
    status, _, body = raw_exchange(
        gateway.port,
        [
            "GET /shub/files/1 HTTP/1.1",
            "Host: 127.0.0.1",
            f"X-VX11-GW-Token: {GATEWAY_TOKEN}",
            "Cookie: sessionid=admin-session; theme=dark; csrftoken=admin-csrf",
            "Cookie: lang=es;sessionid=second-line",
        ],
    )
    assert status == 200, body
    status, _, body = raw_exchange(
        gateway.port,
        [
            "POST /vx11/route/task HTTP/1.1",
            "Host: 127.0.0.1",
            f"X-VX11-Token: {OPERATOR_TOKEN}",
            "Cookie: csrftoken=admin-csrf; sessionid=admin-session",
            "Content-Type: application/json",
            "Content-Length: 2",
        ],
        b"{}",
    )
    assert status == 200, body
    first, second = ({k.lower(): v for k, v in s.headers.items()} for s in upstream.seen)
    assert first["cookie"] == "theme=dark; lang=es"
    assert "cookie" not in second  # nothing left: no header at all
    for seen in upstream.seen:
        assert "admin-session" not in str(seen.headers)
        assert "admin-csrf" not in str(seen.headers)
        assert "second-line" not in str(seen.headers)


def test_a_module_cannot_set_the_gateway_session_or_csrf_cookie(http, upstream):
    async def answer(request: web.Request) -> web.Response:
        headers = CIMultiDict(
            [
                ("Set-Cookie", "sessionid=planted; Path=/; HttpOnly"),
                ("Set-Cookie", "theme=dark; Path=/"),
                ("Set-Cookie", " csrftoken =planted; Path=/"),
            ]
        )
        return web.json_response({}, headers=headers)

    upstream.route("GET", "/files/1", answer)
    r = http.get("/shub/files/1", headers=GW)
    assert r.status_code == 200
    assert r.headers.get_list("set-cookie") == ["theme=dark; Path=/"]


# --------------------------------------------------------------------------- item 8: owned headers


def test_upstream_copies_of_the_gateway_headers_are_dropped(http, upstream, operator_headers):
    async def answer(request: web.Request) -> web.Response:
        headers = CIMultiDict(
            [
                ("X-Correlation-ID", "forged-by-module"),
                ("X-VX11-Module", "forged"),
                ("X-VX11-Intent", "forged"),
                ("X-VX11-Attempts", "99"),
                ("X-Vx11-Anything", "forged"),
                ("RateLimit", '"forged";r=12345;t=1'),
                ("RateLimit-Policy", '"forged";q=12345;w=1'),
                ("ratelimit-extra", "forged"),
                ("X-RateLimit-Limit", "12345"),
                ("X-RateLimit-Remaining", "12345"),
                ("Retry-After", "7"),
                ("X-Module-Own", "kept"),
            ]
        )
        return web.json_response({}, headers=headers)

    upstream.route("POST", "/switch/task", answer)
    r = http.post(
        "/vx11/route/task", json={}, headers={**operator_headers, "X-Correlation-ID": "mine-1"}
    )
    assert r.status_code == 200
    h = r.headers
    assert h.get_list("x-correlation-id") == ["mine-1"]
    assert h.get_list("x-vx11-module") == ["switch"]
    assert h.get_list("x-vx11-intent") == ["task"]
    assert h.get_list("x-vx11-attempts") == ["1"]
    assert "x-vx11-anything" not in h
    assert "ratelimit-extra" not in h
    assert len(h.get_list("ratelimit")) == 1 and "forged" not in h["ratelimit"]
    assert len(h.get_list("ratelimit-policy")) == 1 and "forged" not in h["ratelimit-policy"]
    assert h.get_list("x-ratelimit-limit") == ["1000"]  # the gateway's token limit
    assert len(h.get_list("x-ratelimit-remaining")) == 1
    assert "12345" not in str(h)
    assert h["retry-after"] == "7"  # the module's own
    assert h["x-module-own"] == "kept"


# --------------------------------------------------------------------------- item 6: XFF lines


def test_x_forwarded_for_on_two_lines_is_one_list(gateway, upstream, gw_env):
    """HAProxy ``option forwardfor`` adds a line after the client's own (forged) one."""
    gw_env.set(VX11_TRUSTED_PROXIES="127.0.0.1/32", VX11_RATE_LIMIT_IP="1")
    answers = []
    for forged in ("6.6.6.6", "7.7.7.7"):  # the client changes its forged line each time
        answers.append(
            raw_exchange(
                gateway.port,
                [
                    "GET /shub/health HTTP/1.1",
                    "Host: 127.0.0.1",
                    f"X-Forwarded-For: {forged}",
                    "X-Forwarded-For: 203.0.113.9",
                ],
            )
        )
    assert upstream.seen[0].headers["X-Forwarded-For"] == "6.6.6.6, 203.0.113.9, 127.0.0.1"
    # Both requests are counted against the real client: the second is over its limit.
    assert [status for status, _, _ in answers] == [200, 429]
    assert json.loads(answers[1][2])["scope"] == "ip"


# --------------------------------------------------------------------------- item 13: host, scheme


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "a b", "[::1"])
def test_a_host_outside_allowed_hosts_is_400_on_the_proxy_paths(gateway, upstream, host):
    for head in (
        ["GET /shub/health HTTP/1.1", f"Host: {host}"],
        [
            "POST /vx11/route/task HTTP/1.1",
            f"Host: {host}",
            f"X-VX11-Token: {OPERATOR_TOKEN}",
            "Content-Length: 0",
        ],
    ):
        status, headers, body = raw_exchange(gateway.port, head)
        assert status == 400, (host, body)
        assert values(headers, "content-type") == ["application/problem+json"]
        assert json.loads(body)["error"] == "invalid_request"
    assert upstream.seen == []


def test_forwarded_host_is_the_checked_host(http, upstream):
    r = http.get("/shub/files/1", headers={**GW, "X-Forwarded-Host": "evil.example"})
    assert r.status_code == 200
    seen = upstream.seen[-1].headers
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{http.base_url.port}"


@pytest.mark.parametrize(
    ("trusted", "sent", "expected"),
    [
        (None, "https", "http"),  # no trusted proxy: the socket's scheme
        ("10.0.0.0/8", "https", "http"),  # the peer (127.0.0.1) is not a trusted one
        ("127.0.0.1/32", "https", "https"),
        ("127.0.0.1/32", "HTTPS", "https"),
        ("127.0.0.1/32", "javascript", "http"),  # only http or https are believed
        ("127.0.0.1/32", "http, https", "https"),  # the trusted proxy appended its own
    ],
)
def test_forwarded_proto_is_believed_only_from_a_trusted_proxy(
    http, upstream, gw_env, trusted, sent, expected
):
    gw_env.set(VX11_TRUSTED_PROXIES=trusted)
    r = http.get("/shub/files/1", headers={**GW, "X-Forwarded-Proto": sent})
    assert r.status_code == 200
    assert upstream.seen[-1].headers["X-Forwarded-Proto"] == expected


def test_two_host_headers_are_400_before_the_module(process_gateway, raw_upstream):
    raw_upstream.answers["/two-hosts"] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    status, _, body = raw_exchange(
        process_gateway.port,
        [
            "GET /shub/two-hosts HTTP/1.1",
            "Host: 127.0.0.1",
            "Host: evil.example",
            f"X-VX11-GW-Token: {GATEWAY_TOKEN}",
        ],
    )
    assert status == 400, body
    assert json.loads(body)["error"] == "invalid_request"
    assert "/two-hosts" not in raw_upstream.seen


# --------------------------------------------------------------------------- item 7: 204 / 304


def test_204_and_304_with_content_length_keep_the_client_connection(process_gateway, raw_upstream):
    raw_upstream.answers["/not-modified"] = (
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 42\r\n\r\n'
    )
    raw_upstream.answers["/no-content"] = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
    raw_upstream.answers["/plain"] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    client = KeptAlive(process_gateway.port)
    try:  # three requests on one kept-alive client connection
        answers = [client.get("/shub" + p, GW) for p in ("/not-modified", "/no-content", "/plain")]
    finally:
        client.close()
    (s304, h304, b304), (s204, h204, b204), (s200, _, b200) = answers
    assert (s304, b304, h304["etag"]) == (304, b"", '"v1"')
    assert (s204, b204) == (204, b"")
    assert "content-length" not in h204  # RFC 9110 §8.6: never on a 204
    assert "content-length" not in h304  # uvicorn would wait for 42 bytes that never come
    assert (s200, b200) == (200, b"hello")


def test_path_parameters_on_ordinary_segments_pass(gateway, upstream):
    raw_paths: list[str] = []

    async def record_raw(request: web.Request) -> web.Response:
        raw_paths.append(request.raw_path)
        return web.json_response({})

    upstream.default = record_raw
    status, _, body = raw_exchange(
        gateway.port,
        [
            "GET /shub/files/a;v=1/b;x HTTP/1.1",
            "Host: 127.0.0.1",
            f"X-VX11-GW-Token: {GATEWAY_TOKEN}",
        ],
    )
    assert status == 200, body
    assert raw_paths == ["/files/a;v=1/b;x"]


# --------------------------------------------------------------------------- item 4: priority


@pytest.mark.parametrize(
    ("method", "path", "priority"),
    [
        ("GET", "/shub/health", "health"),
        ("HEAD", "/shub/ready", "health"),
        ("POST", "/shub/health", "other"),
        ("PUT", "/shub/ready", "other"),
        ("GET", "/shub/files/1", "other"),
    ],
)
async def test_health_priority_is_only_for_get_and_head(gateway, method, path, priority):
    from gateway.edge.headers import RequestHead
    from gateway.edge.proxy import ProxyApp

    headers = [(b"host", b"127.0.0.1"), (b"x-vx11-gw-token", GATEWAY_TOKEN.encode())]
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
    }
    call = await ProxyApp().build_call(scope, "cid-1", RequestHead(headers))
    assert call.priority == priority


# --------------------------------------------------------------------------- item 13: check --deploy


def documented_production_env() -> dict[str, str]:
    """The ``sh`` block of DEPLOYMENT.md's "TLS and hosts" section, placeholders filled."""
    text = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    section = text.split("## TLS and hosts", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    env = {}
    for line in block.strip().splitlines():
        name, _, value = line.partition("=")
        env[name] = secrets.token_urlsafe(64) if value.startswith("<") else value
    return env


def test_documented_production_configuration_passes_check_deploy(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "VX11_"))}
    env.update(documented_production_env())
    env.update({"VX11_VAR_DIR": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3"})
    assert "DJANGO_DEBUG" not in env and len(env["DJANGO_SECRET_KEY"]) >= 50
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "System check identified no issues" in output, output


def test_check_deploy_warns_when_behind_tls_without_trusted_proxies(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "VX11_"))}
    env.update(documented_production_env())
    env.update({"VX11_VAR_DIR": str(tmp_path), "VX11_TRUSTED_PROXIES": ""})
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "gateway.W005" in done.stdout + done.stderr


def test_the_csrf_header_never_reaches_the_module(http, upstream):
    """Swagger UI's "try it out" sends X-CSRFToken on every POST; unmasked it is the CSRF
    cookie's secret, so it is a gateway credential like the cookie."""
    r = http.post(
        "/vx11/route/task",
        json={},
        headers={**OP, "X-CSRFToken": "a" * 64, "X-Other": "kept"},
    )
    assert r.status_code == 200, r.text
    sent = {k.lower(): v for k, v in upstream.seen[-1].headers.items()}
    assert "x-csrftoken" not in sent
    assert sent.get("x-other") == "kept"


def test_a_nameless_set_cookie_cannot_set_the_session_cookie(http, upstream):
    """``Set-Cookie: =sessionid=X`` is stored by browsers with an empty name and sent back
    as ``Cookie: sessionid=X``: it is dropped like a plain ``sessionid=X``."""
    upstream.respond(
        "POST",
        "/switch/task",
        body={"ok": True},
        headers={"Set-Cookie": "=sessionid=ATTACKER; Path=/"},
    )
    r = http.post("/vx11/route/task", json={}, headers=OP)
    assert r.status_code == 200
    assert "set-cookie" not in r.headers
