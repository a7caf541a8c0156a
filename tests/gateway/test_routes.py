"""The route table: code defaults, database overrides, the management API, the snapshot."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured

from gateway.api.serializers import EffectiveRouteSerializer, RouteSerializer
from gateway.config.routes import CODE_ROUTES, OVERRIDABLE, IntentType
from gateway.config.shapes import BREAKER_FIELDS, ROUTE_FIELDS, check_model
from gateway.core.conf import GatewaySettings, gw
from gateway.core.knobs import knob
from gateway.models import Module, Route
from tests.conftest import OPERATOR_TOKEN, wait_until
from tests.servers import GatewayProcess, fresh_database_url


def test_code_table_matches_the_spec():
    assert set(CODE_ROUTES) == {i.value for i in IntentType}
    chat = CODE_ROUTES["chat"]
    assert (chat.module, chat.endpoint, chat.method, chat.timeout, chat.context7) == (
        "switch",
        "/switch/route-v5",
        "POST",
        15,
        True,
    )
    assert CODE_ROUTES["analysis"].priority == "analysis" and CODE_ROUTES["analysis"].protected
    assert CODE_ROUTES["spawn"].timeout == 120 and CODE_ROUTES["spawn"].module == "spawner"
    assert CODE_ROUTES["stream"].streaming and CODE_ROUTES["stream"].timeout == 300


def test_one_shape_drives_route_model_api_and_effective_entry():
    assert OVERRIDABLE == ROUTE_FIELDS
    assert list(RouteSerializer().fields) == ["intent", *ROUTE_FIELDS, "enabled"]
    entry = CODE_ROUTES["chat"].as_dict()
    assert list(entry) == ["intent", *ROUTE_FIELDS, "enabled", "source"]
    assert list(EffectiveRouteSerializer().fields) == list(entry)

    @dataclass
    class Drifted:
        timeout: int | None = None  # the column is a FloatField

    with pytest.raises(ImproperlyConfigured, match=r"Route\.timeout"):
        check_model(Route, Drifted)


def test_module_row_carries_its_breaker_settings():
    row = Module(name="m", url="http://m:1", failure_threshold=7, window_seconds=2.5)
    info = row.info()
    assert (info.name, info.url, info.source) == ("m", "http://m:1", "database")
    assert {name: getattr(info, name) for name in BREAKER_FIELDS} == {
        name: getattr(row, name) for name in BREAKER_FIELDS
    }
    assert info.breaker_overrides() == {"failure_threshold": 7, "window_seconds": 2.5}


def test_knobs_are_typed_attributes(monkeypatch):
    monkeypatch.setenv("VX11_RETRY_MAX", "5")
    gw.reload()
    try:
        assert gw.retry_max == 5 and type(gw.retry_max) is int
        assert type(gw.client_body_timeout) is float
        assert vars(gw)["retry_max"] == 5  # loaded once; later reads are plain lookups
        generation = gw.generation
        gw.reload()
        assert "retry_max" not in vars(gw) and gw.generation == generation + 1
    finally:
        monkeypatch.delenv("VX11_RETRY_MAX")
        gw.reload()
    assert GatewaySettings.retry_max.env == "VX11_RETRY_MAX"
    with pytest.raises(TypeError, match="VX11_RETRY_MIN"):
        type("Bad", (), {"retry_max": knob("VX11_RETRY_MIN", 1, "misnamed")})


def test_list_shows_effective_table_with_sources(http, operator_headers):
    Route.objects.create(intent="chat", timeout=5)
    r = http.get("/vx11/routes", headers=operator_headers)
    assert r.status_code == 200
    routes = {x["intent"]: x for x in r.json()["routes"]}
    assert set(routes) == set(CODE_ROUTES)
    assert routes["chat"]["source"] == "database" and routes["chat"]["timeout"] == 5
    assert routes["chat"]["endpoint"] == "/switch/route-v5"  # inherited field
    assert routes["code"]["source"] == "code"


def test_any_client_may_read_but_only_admins_change(http, make_client):
    _, token = make_client("reader")
    _, admin_token = make_client("boss", is_admin=True)
    assert http.get("/vx11/routes", headers={"X-VX11-Token": token}).status_code == 200
    r = http.patch("/vx11/routes/chat", json={"timeout": 3}, headers={"X-VX11-Token": token})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = http.patch("/vx11/routes/chat", json={"timeout": 3}, headers={"X-VX11-Token": admin_token})
    assert r.status_code in (200, 201) and r.json()["timeout"] == 3
    assert http.get("/vx11/routes").status_code == 401
    assert http.get("/vx11/routes", headers={"X-VX11-Token": "bad"}).status_code == 403


def test_register_a_new_intent_and_proxy_through_it(http, upstream, operator_headers):
    r = http.post(
        "/vx11/routes",
        json={
            "intent": "translate",
            "module": "hermes",
            "endpoint": "/hermes/translate",
            "timeout": 5,
        },
        headers=operator_headers,
    )
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "database" and r.json()["method"] == "POST"
    r = http.post("/vx11/route/translate", json={"t": 1}, headers=operator_headers)
    assert r.status_code == 200
    assert upstream.seen[-1].path == "/hermes/translate"


def test_override_changes_the_proxy_at_once_and_delete_falls_back(http, upstream, operator_headers):
    r = http.patch(
        "/vx11/routes/task",
        json={"endpoint": "/switch/task-v2", "method": "PUT"},
        headers=operator_headers,
    )
    assert r.status_code in (200, 201), r.text
    http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert (upstream.seen[-1].method, upstream.seen[-1].path) == ("PUT", "/switch/task-v2")
    r = http.delete("/vx11/routes/task", headers=operator_headers)
    assert r.status_code == 200 and r.json()["source"] == "code"
    http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert (upstream.seen[-1].method, upstream.seen[-1].path) == ("POST", "/switch/task")


def test_put_replaces_the_override(http, operator_headers):
    http.patch(
        "/vx11/routes/chat", json={"timeout": 3, "description": "x"}, headers=operator_headers
    )
    r = http.put("/vx11/routes/chat", json={"description": "only this"}, headers=operator_headers)
    assert r.status_code == 200
    assert r.json()["timeout"] == 15 and r.json()["description"] == "only this"


def test_disable_an_intent_lists_it_disabled_and_refuses_it(http, operator_headers):
    http.patch("/vx11/routes/spawn", json={"enabled": False}, headers=operator_headers)
    r = http.get("/vx11/routes/spawn", headers=operator_headers)
    assert r.json()["enabled"] is False
    r = http.post("/vx11/route/spawn", json={}, headers=operator_headers)
    assert r.status_code == 404 and r.json()["error"] == "unknown_intent"


@pytest.mark.parametrize(
    "payload,field",
    [
        ({"intent": "x1", "module": "nosuch", "endpoint": "/a"}, "module"),
        ({"intent": "x2", "module": "madre", "endpoint": "a"}, "endpoint"),
        ({"intent": "x3", "module": "madre", "endpoint": "http://evil/a"}, "endpoint"),
        ({"intent": "x4", "module": "madre", "endpoint": "/a/../b"}, "endpoint"),
        ({"intent": "x5", "module": "madre", "endpoint": "/a", "method": "TRACE"}, "method"),
        ({"intent": "x6", "module": "madre", "endpoint": "/a", "timeout": 0.01}, "timeout"),
        ({"intent": "x7", "module": "madre", "endpoint": "/a", "timeout": 601}, "timeout"),
        ({"intent": "x8"}, "module"),
        ({"intent": "Bad Intent", "module": "madre", "endpoint": "/a"}, "intent"),
    ],
)
def test_invalid_routes_are_refused_with_clear_errors(http, operator_headers, payload, field):
    r = http.post("/vx11/routes", json=payload, headers=operator_headers)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "invalid_request"
    assert field in body["errors"], body


def test_malformed_json_on_management_api_is_400(http, operator_headers):
    r = http.post(
        "/vx11/routes",
        content=b"{not json",
        headers={**operator_headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_unknown_route_is_404_not_found(http, operator_headers):
    r = http.get("/vx11/routes/nothing", headers=operator_headers)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = http.delete("/vx11/routes/chat", headers=operator_headers)  # no override to delete
    assert r.status_code == 404


def test_warm_hot_path_makes_no_database_query(http, operator_headers, make_client, monkeypatch):
    """Counts queries on every connection of every thread (the proxy runs elsewhere)."""
    from django.db.backends import utils

    _, token = make_client("counted")
    count = {"n": 0}
    original = utils.CursorWrapper.execute

    def counting(self, *args, **kwargs):
        count["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(utils.CursorWrapper, "execute", counting)
    assert (
        http.post("/vx11/route/task", json={}, headers={"X-VX11-Token": token}).status_code == 200
    )
    assert count["n"] > 0  # the cold request loaded the snapshot: the counter sees queries
    count["n"] = 0
    for _ in range(20):
        assert (
            http.post("/vx11/route/task", json={}, headers={"X-VX11-Token": token}).status_code
            == 200
        )
    assert count["n"] == 0


@pytest.mark.db_backend
@pytest.mark.reliability
def test_a_route_change_reaches_a_second_process_within_a_second(redis_url, upstream):
    """Two gateway processes share a database and Redis; one is changed, the other follows."""
    workdir = tempfile.mkdtemp(prefix="vx11-mp-")
    db_url = fresh_database_url(os.environ.get("DATABASE_URL"), workdir)
    env = {
        "DATABASE_URL": db_url,
        "VX11_REDIS_URL": redis_url,
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_VAR_DIR": workdir,
        "VX11_MODULE_SWITCH_URL": upstream.url,
        "VX11_MODULE_MADRE_URL": upstream.url,
    }
    GatewayProcess.migrate(env)
    a, b = GatewayProcess(env).start(), GatewayProcess(env).start()
    try:
        headers = {"X-VX11-Token": OPERATOR_TOKEN}
        with httpx.Client(timeout=10) as client:
            assert (
                client.post(b.url + "/vx11/route/task", json={}, headers=headers).status_code == 200
            )
            assert upstream.seen[-1].path == "/switch/task"
            r = client.patch(
                a.url + "/vx11/routes/task", json={"endpoint": "/switch/elsewhere"}, headers=headers
            )
            assert r.status_code in (200, 201), r.text
            changed_at = time.monotonic()

            def b_uses_new_route() -> bool:
                client.post(b.url + "/vx11/route/task", json={}, headers=headers)
                return bool(upstream.seen[-1].path == "/switch/elsewhere")

            assert wait_until(b_uses_new_route, timeout=3, interval=0.05)
            assert time.monotonic() - changed_at < 1.0
    finally:
        a.stop()
        b.stop()
