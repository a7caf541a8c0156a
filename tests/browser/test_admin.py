"""The admin in a real browser: route overrides reach the proxy, tokens are shown once."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import WsGateway, log_in, screenshot
from tests.conftest import OPERATOR_TOKEN

pytestmark = pytest.mark.browser

OPERATOR = {"X-VX11-Token": OPERATOR_TOKEN}


def proxied_path(site: WsGateway, upstream: Any, intent: str) -> str:
    with httpx.Client(base_url=site.url, headers=OPERATOR, timeout=10) as http:
        answer = http.post(f"/vx11/route/{intent}", json={"n": 1})
    assert answer.status_code == 200, answer.text
    return str(upstream.seen[-1].path)


def test_a_route_override_edited_in_the_admin_is_used_by_the_proxy(
    site: WsGateway, staff: Any, upstream: Any, page: Any
) -> None:
    assert proxied_path(site, upstream, "task") == "/switch/task"
    log_in(page, site.url, "/admin/dashboard/")
    dashboard = page
    expect(dashboard.locator("#vx-connection")).to_have_attribute("data-state", "live")
    admin = page.context.new_page()

    admin.goto(f"{site.url}/admin/gateway/route/")
    task = admin.locator('#effective-routes tr[data-intent="task"]')
    expect(task).to_contain_text("/switch/task")
    expect(task).to_contain_text("code")

    admin.get_by_role("link", name="Add route").click()
    admin.fill("#id_intent", "task")
    admin.fill("#id_endpoint", "/switch/task-v2")
    admin.click("input[name=_save]")
    expect(admin.locator(".messagelist")).to_contain_text("was added successfully")
    expect(task).to_contain_text("/switch/task-v2")
    expect(task).to_contain_text("database")
    assert proxied_path(site, upstream, "task") == "/switch/task-v2"
    expect(dashboard.locator("#vx-global-feedback")).to_contain_text("Route “task” saved")
    screenshot(admin, "admin-routes")

    # Edit the override through the change list and its form.
    admin.locator("#result_list").get_by_role("link", name="task").click()
    admin.fill("#id_endpoint", "/switch/task-v3")
    admin.click("input[name=_save]")
    expect(admin.locator(".messagelist")).to_contain_text("was changed successfully")
    assert proxied_path(site, upstream, "task") == "/switch/task-v3"


def test_a_bad_route_override_is_refused_with_a_clear_message(
    site: WsGateway, staff: Any, upstream: Any, page: Any
) -> None:
    log_in(page, site.url, "/admin/gateway/route/add/")
    page.fill("#id_intent", "task")
    page.fill("#id_endpoint", "http://evil.example/steal")
    page.click("input[name=_save]")
    expect(page.locator(".errornote")).to_be_visible()
    expect(page.locator(".field-endpoint .errorlist")).not_to_be_empty()
    assert proxied_path(site, upstream, "task") == "/switch/task"


def test_a_new_api_client_token_is_shown_exactly_once(
    site: WsGateway, staff: Any, upstream: Any, page: Any
) -> None:
    log_in(page, site.url, "/admin/gateway/apiclient/add/")
    page.fill("#id_name", "robot")
    page.click("input[name=_save]")
    shown = page.locator("#new-token")
    expect(shown).to_be_visible()
    token = shown.inner_text().strip()
    assert len(token) >= 32
    screenshot(page, "admin-api-client-token")

    with httpx.Client(base_url=site.url, timeout=10) as http:
        answer = http.post("/vx11/route/task", json={}, headers={"X-VX11-Token": token})
    assert answer.status_code == 200

    page.reload()
    expect(page.locator("#result_list")).to_contain_text("robot")
    assert page.locator("#new-token").count() == 0
    assert token not in page.content()
    page.locator("#result_list").get_by_role("link", name="robot").click()
    expect(page.locator("#id_name")).to_have_value("robot")
    assert token not in page.content()
