"""Breaker management: the status and modules endpoints, operator actions (API, admin,
command) and that they reach the live proxy, in memory and through Redis."""

from __future__ import annotations

import io
import time

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from gateway.models import BreakerTransition, Module, ModuleHealth
from gateway.operations.breakers import breaker_statuses, force_breaker
from tests.conftest import MODULE_NAMES

BREAKER_FIELDS = {"state", "failure_count", "last_failure", "opened_at", "retry_after"}


def act(http, headers, module: str, action: str):
    return http.post(f"/vx11/circuit-breaker/{module}", json={"action": action}, headers=headers)


def proxied(http, headers):
    return http.post("/vx11/route/task", json={"x": 1}, headers=headers)


# --------------------------------------------------------------------------- reading


def test_status_endpoint_has_the_exact_spec_shape(http, operator_headers):
    before = time.time()
    r = http.get("/vx11/circuit-breaker/status", headers=operator_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"status", "breakers", "timestamp"}
    assert body["status"] == "ok"
    assert isinstance(body["timestamp"], float) and before <= body["timestamp"] <= time.time()
    assert set(body["breakers"]) == set(MODULE_NAMES)
    for breaker in body["breakers"].values():
        assert breaker == {
            "state": "closed",
            "failure_count": 0,
            "last_failure": None,
            "opened_at": None,
            "retry_after": 0.0,
        }


def test_status_reads_any_token_and_refuses_none(http, make_client):
    _, token = make_client("reader")
    assert (
        http.get("/vx11/circuit-breaker/status", headers={"X-VX11-Token": token}).status_code == 200
    )
    assert http.get("/vx11/modules", headers={"X-VX11-Token": token}).status_code == 200
    r = http.get("/vx11/circuit-breaker/status")
    assert r.status_code == 401 and r.json()["error"] == "auth_required"
    assert http.get("/vx11/modules").status_code == 401


def test_status_shows_a_tripped_breaker(http, operator_headers, upstream):
    upstream.respond("POST", "/switch/task", status=503)
    for _ in range(3):
        assert proxied(http, operator_headers).status_code == 503
    r = http.get("/vx11/circuit-breaker/status", headers=operator_headers)
    switch = r.json()["breakers"]["switch"]
    assert switch["state"] == "open" and switch["failure_count"] == 3
    assert switch["opened_at"] is not None and switch["last_failure"] is not None
    assert 0 < switch["retry_after"] <= 60
    assert r.json()["breakers"]["madre"]["state"] == "closed"


def test_modules_endpoint_lists_url_health_and_breaker(http, operator_headers, upstream):
    Module.objects.create(
        name="extra", url="http://127.0.0.1:9", health_path="/ping", enabled=False
    )
    ModuleHealth.objects.create(
        module="switch", status="up", latency_ms=1.5, consecutive_failures=0
    )
    r = http.get("/vx11/modules", headers=operator_headers)
    assert r.status_code == 200, r.text
    modules = {m["name"]: m for m in r.json()["modules"]}
    assert set(modules) == {*MODULE_NAMES, "extra"} and r.json()["count"] == len(modules)
    switch = modules["switch"]
    assert (switch["url"], switch["enabled"], switch["source"], switch["health_path"]) == (
        upstream.url,
        True,
        "env",
        "/health",
    )
    assert switch["health"]["status"] == "up" and switch["health"]["latency_ms"] == 1.5
    assert set(switch["health"]) == {
        "status",
        "latency_ms",
        "last_check",
        "consecutive_failures",
        "last_error",
    }
    assert set(switch["breaker"]) == BREAKER_FIELDS
    extra = modules["extra"]
    assert (extra["enabled"], extra["source"], extra["health_path"]) == (False, "database", "/ping")
    assert extra["health"]["status"] == "unknown" and extra["breaker"]["state"] == "closed"


# --------------------------------------------------------------------------- API actions


def test_force_open_via_api_makes_the_proxy_refuse_and_reset_restores_it(
    http, operator_headers, upstream
):
    r = act(http, operator_headers, "switch", "force_open")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["module"], body["action"], body["forced"]) == ("switch", "force_open", "open")
    assert body["breaker"]["state"] == "open" and set(body["breaker"]) == BREAKER_FIELDS
    refused = proxied(http, operator_headers)
    assert refused.status_code == 503 and refused.json()["error"] == "circuit_open"
    assert refused.json()["module"] == "switch" and "retry-after" in refused.headers
    assert not [s for s in upstream.seen if s.path == "/switch/task"]

    r = act(http, operator_headers, "switch", "reset")
    assert r.status_code == 200 and r.json()["breaker"]["state"] == "closed"
    assert r.json()["forced"] is None
    assert proxied(http, operator_headers).status_code == 200
    reasons = list(
        BreakerTransition.objects.filter(module="switch")
        .order_by("at", "id")
        .values_list("reason", "to_state")
    )
    assert reasons == [("force_open", "open"), ("reset", "closed")]


def test_force_closed_admits_calls_and_auto_hands_back(http, operator_headers, upstream):
    upstream.respond("POST", "/switch/task", status=503)
    assert act(http, operator_headers, "switch", "force_closed").json()["forced"] == "closed"
    for _ in range(5):
        assert proxied(http, operator_headers).status_code == 503  # the module's own 503
    status = http.get("/vx11/circuit-breaker/switch", headers=operator_headers).json()
    assert status["breaker"]["state"] == "closed" and status["forced"] == "closed"
    r = act(http, operator_headers, "switch", "auto")
    assert r.status_code == 200 and r.json()["forced"] is None


def test_actions_need_an_admin(http, make_client):
    _, token = make_client("plain")
    r = act(http, {"X-VX11-Token": token}, "switch", "force_open")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert http.post("/vx11/circuit-breaker/switch", json={"action": "reset"}).status_code == 401
    _, admin_token = make_client("boss", is_admin=True)
    assert act(http, {"X-VX11-Token": admin_token}, "switch", "reset").status_code == 200


def test_unknown_module_is_404(http, operator_headers):
    r = act(http, operator_headers, "nope", "reset")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["error"] == "not_found"
    assert http.get("/vx11/circuit-breaker/nope", headers=operator_headers).status_code == 404


@pytest.mark.parametrize("body", [{"action": "explode"}, {}, {"action": 3}, ["reset"]], ids=str)
def test_bad_action_is_400(http, operator_headers, body):
    r = http.post("/vx11/circuit-breaker/switch", json=body, headers=operator_headers)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request"
    assert "force_open" in r.json()["detail"]


def test_malformed_json_is_400(http, operator_headers):
    r = http.post(
        "/vx11/circuit-breaker/switch",
        content=b"{nope",
        headers={**operator_headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_an_action_from_another_thread_and_loop_reaches_the_live_proxy(http, operator_headers):
    """In memory, the proxy's loop and a management call's loop share the breaker state."""
    assert force_breaker("switch", "force_open").state == "open"
    assert proxied(http, operator_headers).json()["error"] == "circuit_open"
    assert breaker_statuses(names=["switch"])["switch"].state == "open"
    force_breaker("switch", "auto")
    assert proxied(http, operator_headers).status_code == 200


def test_api_actions_work_on_the_shared_redis_state(
    http, operator_headers, gw_env, redis_url, upstream
):
    gw_env.set(VX11_REDIS_URL=redis_url)
    assert act(http, operator_headers, "switch", "force_open").status_code == 200
    assert proxied(http, operator_headers).json()["error"] == "circuit_open"
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.hget("vx11:cb:switch", "forced") == b"open"
    client.close()
    assert act(http, operator_headers, "switch", "reset").status_code == 200
    assert proxied(http, operator_headers).status_code == 200


# --------------------------------------------------------------------------- admin


@pytest.fixture
def staff(gateway):
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user(
        "ops", password="pw", is_staff=True, is_superuser=True
    )
    client = Client()
    client.force_login(user)
    return client


def admin_action(staff, action: str, *modules: Module) -> list[str]:
    r = staff.post(
        "/admin/gateway/module/",
        {"action": action, "_selected_action": [m.pk for m in modules]},
        follow=True,
    )
    assert r.status_code == 200
    return [str(m) for m in r.context["messages"]]


def test_admin_actions_force_and_reset_the_breaker_the_proxy_uses(http, staff, operator_headers):
    switch, _ = Module.objects.get_or_create(name="switch")
    messages = admin_action(staff, "breaker_force_open", switch)
    assert messages == ["Breaker force_open: switch → open."]
    assert proxied(http, operator_headers).json()["error"] == "circuit_open"
    assert admin_action(staff, "breaker_force_closed", switch) == [
        "Breaker force_closed: switch → closed."
    ]
    assert admin_action(staff, "breaker_auto", switch) == ["Breaker auto: switch → closed."]
    admin_action(staff, "breaker_force_open", switch)
    assert admin_action(staff, "breaker_reset", switch) == ["Breaker reset: switch → closed."]
    assert proxied(http, operator_headers).status_code == 200


def test_admin_probe_now_stores_the_result_and_half_opens_an_open_breaker(
    http, staff, operator_headers, upstream
):
    switch, _ = Module.objects.get_or_create(name="switch")
    upstream.respond("POST", "/switch/task", status=503)
    for _ in range(3):
        proxied(http, operator_headers)
    assert breaker_statuses(names=["switch"])["switch"].state == "open"
    messages = admin_action(staff, "probe_now", switch)
    assert len(messages) == 1 and messages[0].startswith("switch: up (")
    row = ModuleHealth.objects.get(module="switch")
    assert (row.status, row.consecutive_failures) == ("up", 0) and row.last_check is not None
    assert breaker_statuses(names=["switch"])["switch"].state == "half_open"
    assert [s.path for s in upstream.seen if s.method == "GET"] == ["/health"]


def test_admin_probe_now_reports_a_down_module(http, staff, gw_env):
    gw_env.set(VX11_MODULE_MADRE_URL="http://127.0.0.1:9")
    madre, _ = Module.objects.get_or_create(name="madre")
    assert admin_action(staff, "probe_now", madre) == [
        "madre: down — connection failed (1 failure(s) in a row)."
    ]
    assert ModuleHealth.objects.get(module="madre").last_error == "connection failed"


# --------------------------------------------------------------------------- command


def test_breaker_command_without_redis_acts_on_the_gateway(http, operator_headers, gw_env):
    """SPEC §16: with or without Redis (it used to refuse without one). Cross-process:
    tests/gateway/test_cross_process.py."""
    out = io.StringIO()
    call_command("breaker", "open", "switch", stdout=out)
    assert "switch: force_open done, now open" in out.getvalue()
    assert proxied(http, operator_headers).json()["error"] == "circuit_open"
    out = io.StringIO()
    call_command("breaker", "status", "switch", stdout=out)
    assert out.getvalue().splitlines()[1].split()[:3] == ["switch", "open", "open"]
    call_command("breaker", "reset", "switch", stdout=io.StringIO())
    assert proxied(http, operator_headers).status_code == 200


def test_breaker_command_acts_on_shared_state_the_live_gateway_sees(
    http, operator_headers, gw_env, redis_url
):
    gw_env.set(VX11_REDIS_URL=redis_url)
    out = io.StringIO()
    call_command("breaker", "open", "switch", stdout=out)
    assert "switch: force_open done, now open" in out.getvalue()
    assert proxied(http, operator_headers).json()["error"] == "circuit_open"

    out = io.StringIO()
    call_command("breaker", "status", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["MODULE", "STATE", "FORCED", "FAILURES"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(MODULE_NAMES)
    assert rows["switch"][1:3] == ["open", "open"] and rows["madre"][1:3] == ["closed", "-"]

    call_command("breaker", "close", "switch", stdout=io.StringIO())
    call_command("breaker", "auto", "switch", stdout=io.StringIO())
    call_command("breaker", "reset", "switch", stdout=io.StringIO())
    assert proxied(http, operator_headers).status_code == 200
    out = io.StringIO()
    call_command("breaker", "status", "switch", stdout=out)
    assert out.getvalue().splitlines()[1].split()[:3] == ["switch", "closed", "-"]


def test_breaker_command_refuses_unknown_module_and_missing_module(
    transactional_db, gw_env, redis_url
):
    gw_env.set(VX11_REDIS_URL=redis_url)
    with pytest.raises(CommandError, match="unknown module 'nope'"):
        call_command("breaker", "reset", "nope")
    with pytest.raises(CommandError, match="needs a MODULE"):
        call_command("breaker", "reset")
