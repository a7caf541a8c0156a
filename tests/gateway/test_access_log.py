"""The access log (SPEC §22, issue #17 item 3): one JSON line per proxied request.

A real gateway process with ``VX11_ACCESS_LOG=true`` (and ``VX11_LOG_LEVEL=WARNING``: the
access log does not depend on it) in front of a real upstream; each request carries its
own correlation id, and its line is found by it in the process's output.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.core.tokens import hash_token
from gateway.edge.accesslog import PATH_LIMIT
from tests.conftest import GATEWAY_TOKEN, MODULE_NAMES, OPERATOR_TOKEN
from tests.servers import GatewayProcess, UpstreamServer, fresh_database_url

FIELDS = {
    "time",
    "correlation_id",
    "principal",
    "client_ip",
    "method",
    "intent",
    "path",
    "module",
    "target",
    "status",
    "attempts",
    "fallback",
    "upstream_ms",
    "total_ms",
    "bytes_in",
    "bytes_out",
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer) -> Iterator[GatewayProcess]:
    workdir = tempfile.mkdtemp(prefix="vx11-access-")
    env = {
        "DATABASE_URL": fresh_database_url(None, workdir),
        "VX11_VAR_DIR": workdir,
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "VX11_REDIS_URL": "",
        "VX11_ACCESS_LOG": "true",
        "VX11_LOG_LEVEL": "WARNING",
        **{f"VX11_MODULE_{name.upper()}_URL": upstream.url for name in MODULE_NAMES},
    }
    GatewayProcess.migrate(env)
    server = GatewayProcess(env).start()
    yield server
    server.stop()


def lines_for(gateway: GatewayProcess, cid: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The access-log lines of one correlation id (waited for: the log is written last)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for line in gateway.output().splitlines():
            if cid in line and '"total_ms"' in line:
                found.append(json.loads(line))  # the whole line is one JSON object
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def only_line(gateway: GatewayProcess, cid: str) -> dict[str, Any]:
    found = lines_for(gateway, cid)
    assert len(found) == 1, found
    assert set(found[0]) == FIELDS
    return found[0]


def new_cid() -> str:
    return "test-" + uuid.uuid4().hex


def test_a_success_is_one_line_with_every_field(gateway, upstream):
    cid = new_cid()
    body = b'{"prompt": "hello access log"}'
    r = httpx.post(
        gateway.url + "/vx11/route/task?lang=es",
        content=body,
        headers={"X-VX11-Token": OPERATOR_TOKEN, "X-Correlation-ID": cid},
        timeout=10,
    )
    assert r.status_code == 200
    line = only_line(gateway, cid)
    assert line["correlation_id"] == cid
    assert line["principal"] == "op:" + hash_token(OPERATOR_TOKEN)[:16]
    assert line["client_ip"] == "127.0.0.1"
    assert (line["method"], line["intent"], line["path"]) == ("POST", "task", "/vx11/route/task")
    assert line["module"] == "switch"
    assert line["target"] == f"127.0.0.1:{upstream.port}"
    assert (line["status"], line["attempts"], line["fallback"]) == (200, 1, None)
    assert 0 < line["upstream_ms"] <= line["total_ms"] < 10_000
    assert line["bytes_in"] == len(body)
    assert line["bytes_out"] == len(r.content)
    assert line["time"].endswith("+00:00") and line["time"][:4].isdigit()


def test_an_error_is_logged_with_what_is_known(gateway):
    cid = new_cid()
    r = httpx.post(
        gateway.url + "/vx11/route/task",
        json={},
        headers={"X-VX11-Token": "wrong-" + OPERATOR_TOKEN, "X-Correlation-ID": cid},
        timeout=10,
    )
    assert r.status_code == 403
    line = only_line(gateway, cid)
    assert (line["status"], line["attempts"], line["principal"]) == (403, 0, None)
    assert (line["module"], line["target"], line["upstream_ms"]) == (None, None, None)
    assert line["bytes_out"] == len(r.content) > 0
    assert OPERATOR_TOKEN not in json.dumps(line)


def test_a_module_failure_and_a_shub_path(gateway, upstream):
    upstream.respond("GET", "/files/7", status=503, body={"down": True})
    cid = new_cid()
    r = httpx.get(
        gateway.url + "/shub/files/7",
        headers={"X-VX11-GW-Token": GATEWAY_TOKEN, "X-Correlation-ID": cid},
        timeout=10,
    )
    assert r.status_code == 503
    line = only_line(gateway, cid)
    assert (line["intent"], line["path"], line["module"]) == (None, "/shub/files/7", "shub")
    assert line["status"] == 503 and line["attempts"] >= 1
    assert line["principal"].startswith("gw:")
    assert line["bytes_in"] == 0


def test_a_client_that_leaves_is_499(gateway, upstream):
    cid = new_cid()
    head = "\r\n".join(
        [
            "POST /vx11/route/task HTTP/1.1",
            "Host: 127.0.0.1",
            f"X-VX11-Token: {OPERATOR_TOKEN}",
            f"X-Correlation-ID: {cid}",
            "Content-Type: application/json",
            "Content-Length: 1000",
            "",
            "",
        ]
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head + b'{"half": ')
        time.sleep(0.3)
    line = only_line(gateway, cid)
    assert line["status"] == 499
    assert line["bytes_in"] == len(b'{"half": ')
    assert line["bytes_out"] == 0


def test_the_path_is_bounded_and_no_token_is_ever_written(gateway):
    cid = new_cid()
    long_path = "/vx11/route/" + "x" * 1000
    r = httpx.post(
        gateway.url + long_path,
        json={"token": "not-a-credential"},
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}", "X-Correlation-ID": cid},
        timeout=10,
    )
    assert r.status_code == 404
    line = only_line(gateway, cid)
    assert len(line["path"]) == PATH_LIMIT
    output = gateway.output()
    assert OPERATOR_TOKEN not in output
    assert GATEWAY_TOKEN not in output
