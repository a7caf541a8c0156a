"""Modules, validation, auth rules, commands, docs, health and start-up safety."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command

from gateway.config.modules import CODE_MODULES, build_modules, env_overrides
from gateway.config.validation import validate_module_url
from gateway.core.tokens import hash_token
from gateway.edge.headers import client_ip
from gateway.models import ApiClient, Module

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8002", "https://switch.internal", "http://[::1]:9000", "http://host:1/"],
)
def test_module_urls_accepted(url):
    assert validate_module_url(url).startswith("http")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x",
        "http://",
        "http://h/path",
        "http://h?x=1",
        "http://user:pw@h",
        "http://h:99999",
        "http://h#frag",
        "http://h\\@evil",
        " http://h",
        "javascript:alert(1)",
        "http://h/../x",
    ],
)
def test_module_url_tricks_refused(url):
    with pytest.raises(ValidationError):
        validate_module_url(url)


def test_module_url_overrides_in_order(monkeypatch):
    from gateway.config.modules import ModuleInfo

    monkeypatch.setenv("VX11_MODULE_SWITCH_URL", "http://env-switch:1")
    monkeypatch.setenv("VX11_SHUB_UPSTREAM", "http://alias-shub:2")
    table = build_modules([ModuleInfo("madre", "http://db-madre:3", source="database")])
    assert table["switch"].url == "http://env-switch:1" and table["switch"].source == "env"
    assert table["shub"].url == "http://alias-shub:2"
    assert table["madre"].url == "http://db-madre:3"
    assert table["hermes"].url == CODE_MODULES["hermes"]
    monkeypatch.setenv("VX11_MODULE_SWITCH_URL", "http://bad/path")
    found, errors = env_overrides()
    assert "switch" not in found and "VX11_MODULE_SWITCH_URL" in errors[0]


@pytest.mark.db_backend
def test_module_row_validation(db):
    module = Module(name="newmod", url="http://x/y")
    with pytest.raises(ValidationError):
        module.full_clean()
    Module(name="newmod", url="http://x:9").full_clean()


@pytest.mark.parametrize(
    "peer,xff,trusted,expected",
    [
        ("10.0.0.9", "1.2.3.4", [], ("10.0.0.9", "10.0.0.9")),
        ("10.0.0.9", "1.2.3.4", ["192.168.0.0/16"], ("10.0.0.9", "10.0.0.9")),
        ("10.0.0.9", "1.2.3.4", ["10.0.0.0/8"], ("1.2.3.4", "1.2.3.4, 10.0.0.9")),
        (
            "10.0.0.9",
            "1.2.3.4, 10.0.0.5",
            ["10.0.0.0/8"],
            ("1.2.3.4", "1.2.3.4, 10.0.0.5, 10.0.0.9"),
        ),
        ("10.0.0.9", "6.6.6.6, 1.2.3.4", ["10.0.0.0/8"], ("1.2.3.4", "6.6.6.6, 1.2.3.4, 10.0.0.9")),
        ("10.0.0.9", "garbage", ["10.0.0.0/8"], ("10.0.0.9", "garbage, 10.0.0.9")),
    ],
)
def test_client_ip_rules(peer, xff, trusted, expected):
    assert client_ip(peer, xff, trusted) == expected


@pytest.mark.db_backend
def test_create_api_client_prints_token_last_and_stores_only_its_hash(db):
    out = io.StringIO()
    call_command("create_api_client", "robot", "--admin", stdout=out)
    token = out.getvalue().strip().splitlines()[-1]
    client = ApiClient.objects.get(name="robot")
    assert client.is_admin and client.token_hash == hash_token(token)
    assert token not in str(ApiClient.objects.values_list())
    with pytest.raises(Exception, match="exists already"):
        call_command("create_api_client", "robot", stdout=io.StringIO())


def test_health_and_ready(http):
    r = http.get("/health")
    assert r.json() == {"status": "ok", "module": "vx11-gateway", "version": "1.0.0"}
    r = http.get("/ready")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "cache": "ok"}


def test_ready_is_503_when_redis_is_down(http, gw_env, own_redis):
    from gateway.state import store

    gw_env.set(VX11_REDIS_URL=own_redis.url)
    store.reset()
    assert http.get("/ready").status_code == 200
    own_redis.stop()
    store.reset()
    r = http.get("/ready")
    assert r.status_code == 503 and r.json()["checks"]["cache"] != "ok"


def test_openapi_and_docs_are_served_offline(http):
    schema = http.get("/openapi.json").json()
    assert "/vx11/route/{intent}" in schema["paths"]
    assert "/vx11/routes" in schema["paths"]
    assert "/shub/{path}" in schema["paths"]
    docs = http.get("/docs")
    assert docs.status_code == 200
    assert "//cdn" not in docs.text and "unpkg" not in docs.text
    # The Swagger UI assets come from the gateway itself.
    asset = next(part.split('"')[0] for part in docs.text.split('src="')[1:])
    assert http.get(asset).status_code == 200
    assert http.get("/redoc").status_code == 200


def admin_login(http, username: str, password: str) -> None:
    """Log in through the admin form (CSRF cookie and token first)."""
    login = http.get("/admin/login/")
    token = login.text.split('name="csrfmiddlewaretoken" value="')[1].split('"')[0]
    http.post(
        "/admin/login/",
        data={
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": token,
            "next": "/admin/",
        },
    )


def test_browsable_api_renders_for_staff(http, admin_user):
    admin_login(http, "admin", "password")
    r = http.get("/vx11/routes", headers={"Accept": "text/html"})
    assert r.status_code == 200 and "Route List" in r.text


def test_unknown_path_is_a_404_problem(http):
    r = http.get("/no/such/thing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_production_refuses_to_start_without_token():
    env = {**os.environ, "DJANGO_DEBUG": "0", "VX11_TOKEN": "", "VX11_AUTH_ENABLED": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", "import vx11site.asgi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "VX11_TOKEN" in proc.stderr
    env["VX11_TOKEN"] = "x" * 20
    ok = subprocess.run(
        [sys.executable, "-c", "import vx11site.asgi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr


def test_admin_permission_errors_are_not_turned_into_500(http, django_user_model):
    """A staff user without rights gets Django's 403, not a 500 problem."""
    django_user_model.objects.create_user("clerk", password="pw-123456", is_staff=True)
    admin_login(http, "clerk", "pw-123456")
    r = http.get("/admin/gateway/route/add/")
    assert r.status_code == 403


def test_production_refusal_stops_a_multi_worker_server(tmp_path):
    """uvicorn --workers 2 without VX11_TOKEN exits (it would restart workers forever)."""
    from tests.servers import GatewayProcess

    env = {
        "DJANGO_DEBUG": "0",
        "VX11_TOKEN": "",
        "VX11_VAR_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
    }
    server = GatewayProcess(env, workers=2)
    with pytest.raises(RuntimeError, match="exited"):
        server.start()
    assert "VX11_TOKEN" in server.output()
