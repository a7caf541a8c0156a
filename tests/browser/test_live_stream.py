"""``/ws/events`` through the real server stack (uvicorn, channels' auth middleware)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.browser.conftest import WsGateway
from tests.conftest import OPERATOR_TOKEN


def ws_url(site: WsGateway) -> str:
    return site.url.replace("http://", "ws://") + "/ws/events"


def close_code(site: WsGateway, headers: dict[str, str]) -> int | None:
    with (
        connect(ws_url(site), additional_headers=headers, open_timeout=10) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


def test_a_token_caller_gets_the_snapshot_then_events(site: WsGateway, upstream: Any) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    with connect(ws_url(site), additional_headers=headers, open_timeout=10) as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first["type"] == "snapshot" and "switch" in first["breakers"]
        upstream.respond("POST", "/switch/task", status=503)
        with httpx.Client(base_url=site.url, headers={"X-VX11-Token": OPERATOR_TOKEN}) as http:
            for _ in range(3):
                http.post("/vx11/route/task", json={})
        event = json.loads(ws.recv(timeout=10))
    assert (event["type"], event["module"], event["to"]) == ("breaker.transition", "switch", "open")


def test_callers_without_rights_get_4401_or_4403(site: WsGateway) -> None:
    assert close_code(site, {}) == 4401
    assert close_code(site, {"X-VX11-Token": "wrong"}) == 4403
