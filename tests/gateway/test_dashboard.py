"""The dashboard page and its staff-session endpoints (the browser tests drive them live)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from gateway.operations import registry as services
from gateway.operations.breakers import force_breaker
from tests.conftest import MODULE_NAMES
from tests.servers import free_port

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff_client(gw_env: Any) -> Client:
    from django.contrib.auth.models import User

    services.reset()
    client = Client(enforce_csrf_checks=True)
    client.force_login(User.objects.create_user("ops", password="x-123456789", is_staff=True))
    return client


def csrf_post(client: Client, url: str) -> Any:
    client.get("/admin/dashboard/")  # sets the csrftoken cookie, as the page does
    token = client.cookies["csrftoken"].value
    return client.post(url, data="{}", content_type="application/json", HTTP_X_CSRFTOKEN=token)


def test_anonymous_visitors_are_sent_to_the_login_page(client: Client, gw_env: Any) -> None:
    answer = client.get("/admin/dashboard/")
    assert answer.status_code == 302
    assert answer["Location"].startswith("/admin/login/?next=/admin/dashboard/")


def test_the_page_shows_every_module_with_its_breaker_and_health(staff_client: Client) -> None:
    from gateway.models import ModuleHealth

    ModuleHealth.objects.create(module="hermes", status="down", last_error="connection failed")
    force_breaker("madre", "force_open")
    page = staff_client.get("/admin/dashboard/").content.decode()
    for name in MODULE_NAMES:
        assert f'data-module="{name}"' in page
    assert 'data-module="madre" data-breaker="open"' in page
    assert "open (forced open)" in page
    assert 'data-module="hermes" data-breaker="closed" data-health="down"' in page
    assert "connection failed" in page
    assert 'data-ws-path="/ws/events"' in page


def test_every_admin_page_links_to_the_dashboard(staff_client: Client) -> None:
    page = staff_client.get("/admin/").content.decode()
    assert 'id="vx11-dashboard-link"' in page and 'href="/admin/dashboard/"' in page


def test_clearing_the_cache_needs_a_staff_session(client: Client, gw_env: Any) -> None:
    from django.contrib.auth.models import User

    anonymous = client.post("/admin/dashboard/clear-cache/")
    assert anonymous.status_code == 401
    assert anonymous["Content-Type"] == "application/problem+json"
    client.force_login(User.objects.create_user("guest", password="x-123456789"))
    refused = client.post("/admin/dashboard/clear-cache/")
    assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")


def test_clearing_the_cache_needs_the_csrf_token(staff_client: Client) -> None:
    assert staff_client.post("/admin/dashboard/clear-cache/").status_code == 403
    assert staff_client.get("/admin/dashboard/clear-cache/").status_code == 405


def test_staff_can_clear_the_shared_cache(
    staff_client: Client, gw_env: Any, redis_url: str
) -> None:
    import redis

    gw_env.set(VX11_REDIS_URL=redis_url)
    store = redis.Redis.from_url(redis_url)
    store.set("vx11:cache:GET /shub/health", b"cached answer")
    answer = csrf_post(staff_client, "/admin/dashboard/clear-cache/")
    assert answer.status_code == 200
    body = answer.json()
    assert (body["status"], body["keys_deleted"]) == ("cleared", 1)
    assert isinstance(body["timestamp"], float)
    assert store.exists("vx11:cache:GET /shub/health") == 0
    store.close()


def test_probe_now_stores_and_returns_the_result(
    staff_client: Client, gw_env: Any, upstream: Any
) -> None:
    from gateway.models import ModuleHealth

    gw_env.set(
        VX11_MODULE_SHUB_URL=upstream.url, VX11_MODULE_MCP_URL=f"http://127.0.0.1:{free_port()}"
    )
    up = csrf_post(staff_client, "/admin/dashboard/probe/shub/")
    assert up.status_code == 200, up.content
    assert (up.json()["module"], up.json()["status"]) == ("shub", "up")
    assert upstream.seen[-1].path == "/health"
    down = csrf_post(staff_client, "/admin/dashboard/probe/mcp/").json()
    assert down["status"] == "down" and down["last_error"]
    stored = {row.module: row.status for row in ModuleHealth.objects.all()}
    assert stored["shub"] == "up" and stored["mcp"] == "down"


def test_probing_an_unknown_module_is_a_404_problem(staff_client: Client) -> None:
    answer = csrf_post(staff_client, "/admin/dashboard/probe/nosuch/")
    assert answer.status_code == 404
    assert answer.json()["error"] == "not_found"


def test_the_module_list_shows_health_and_breaker_badges(client: Client, gw_env: Any) -> None:
    from django.contrib.auth.models import User

    from gateway.models import Module, ModuleHealth

    services.reset()
    Module.objects.get_or_create(name="switch")
    Module.objects.get_or_create(name="shub")
    ModuleHealth.objects.create(module="shub", status="up", latency_ms=12.4)
    force_breaker("switch", "force_open")
    client.force_login(User.objects.create_superuser("root", "r@example.com", "x-123456789"))
    page = client.get("/admin/gateway/module/").content.decode()
    assert "open (forced open)" in page
    assert "up · 12 ms" in page
    assert "Breaker state" in page and "Health" in page
