"""The live dashboard in a real browser: events arrive without a reload, buttons work."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import WsGateway, log_in, point_modules_at, screenshot
from tests.conftest import OPERATOR_TOKEN

pytestmark = pytest.mark.browser

OPERATOR = {"X-VX11-Token": OPERATOR_TOKEN}


def card(page: Any, module: str) -> Any:
    return page.locator(f'.vx-card[data-module="{module}"]')


def open_dashboard(page: Any, base_url: str) -> None:
    log_in(page, base_url, "/admin/dashboard/")
    expect(page.locator("#vx-connection")).to_have_attribute("data-state", "live")
    page.evaluate("window.__sameDocument = true")  # gone if the page ever reloads


def test_breaker_opening_shows_live_and_reset_closes_it(
    site: WsGateway, staff: Any, upstream: Any, page: Any
) -> None:
    open_dashboard(page, site.url)
    switch = card(page, "switch")
    expect(switch).to_have_attribute("data-breaker", "closed")
    expect(switch.locator('[data-field="breaker"]')).to_have_text("closed")

    # The gateway serves every browser test: the graphs count other tests' traffic too.
    expect(page.locator("#vx11-dashboard")).to_have_attribute("data-traffic-at", re.compile("."))
    before = int(switch.get_attribute("data-requests") or 0)

    upstream.respond("POST", "/switch/task", status=503)
    with httpx.Client(base_url=site.url, headers=OPERATOR, timeout=10) as http:
        answers = [http.post("/vx11/route/task", json={}).status_code for _ in range(4)]
    assert answers[:3] == [503, 503, 503]
    assert answers[3] == 503  # refused by the open breaker now

    expect(switch).to_have_attribute("data-breaker", "open")
    expect(switch.locator('[data-field="breaker"]')).to_have_text("open")
    expect(switch.locator('[data-field="failures"]')).to_have_text("3")
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    # The graphs refresh every 3 s: the screenshot waits for the failed answers to show.
    page.wait_for_function(
        "n => +document.querySelector('.vx-card[data-module=\"switch\"]').dataset.requests >= n",
        arg=before + 4,
        timeout=10_000,
    )
    screenshot(page, "dashboard-breaker-open")

    page.once("dialog", lambda dialog: dialog.accept())
    switch.get_by_role("button", name="Reset").click()
    expect(switch).to_have_attribute("data-breaker", "closed")
    expect(switch.locator('[data-field="failures"]')).to_have_text("0")
    expect(switch.locator('[data-field="feedback"]')).to_contain_text("Breaker reset")

    upstream.respond("POST", "/switch/task", status=200)
    with httpx.Client(base_url=site.url, headers=OPERATOR, timeout=10) as http:
        assert http.post("/vx11/route/task", json={}).status_code == 200
    assert page.evaluate("window.__sameDocument") is True


def test_a_dismissed_confirmation_changes_nothing(site: WsGateway, staff: Any, page: Any) -> None:
    open_dashboard(page, site.url)
    hermes = card(page, "hermes")
    page.once("dialog", lambda dialog: dialog.dismiss())
    hermes.get_by_role("button", name="Force open").click()
    expect(hermes.locator('[data-field="feedback"]')).to_have_text("Cancelled.")
    with httpx.Client(base_url=site.url, headers=OPERATOR, timeout=10) as http:
        breaker = http.get("/vx11/circuit-breaker/hermes").json()["breaker"]
    assert breaker["state"] == "closed"
    expect(hermes).to_have_attribute("data-breaker", "closed")


def test_force_open_probe_and_clear_cache_buttons(
    site: WsGateway, staff: Any, upstream: Any, page: Any
) -> None:
    open_dashboard(page, site.url)
    page.on("dialog", lambda dialog: dialog.accept())
    madre = card(page, "madre")

    madre.get_by_role("button", name="Force open").click()
    expect(madre).to_have_attribute("data-breaker", "open")
    expect(madre.locator('[data-field="breaker"]')).to_have_text("open (forced open)")
    with httpx.Client(base_url=site.url, headers=OPERATOR, timeout=10) as http:
        refused = http.post("/vx11/route/analysis", json={})
        assert http.get("/vx11/circuit-breaker/madre").json()["forced"] == "open"
    assert (refused.status_code, refused.json()["error"]) == (503, "circuit_open")
    assert not any(s.path == "/madre/task" for s in upstream.seen)

    madre.get_by_role("button", name="Force closed").click()
    expect(madre.locator('[data-field="breaker"]')).to_have_text("closed (forced closed)")

    shub = card(page, "shub")
    expect(shub.locator('[data-field="health"]')).to_have_text("unknown")
    shub.get_by_role("button", name="Probe now").click()
    expect(shub.locator('[data-field="health"]')).to_have_text("up")
    expect(shub.locator('[data-field="latency"]')).to_contain_text("ms")
    assert any(s.method == "GET" and s.path == "/health" for s in upstream.seen)

    with httpx.Client(base_url=site.url, timeout=10) as http:
        assert http.get("/shub/health").headers.get("x-cache") == "MISS"
        assert http.get("/shub/health").headers.get("x-cache") == "HIT"
    page.get_by_role("button", name="Clear response cache").click()
    expect(page.locator("#vx-global-feedback")).to_contain_text("Cache cleared")
    with httpx.Client(base_url=site.url, timeout=10) as http:
        assert http.get("/shub/health").headers.get("x-cache") == "MISS"
    screenshot(page, "dashboard-actions")

    from gateway.models import Module

    for name in ("madre", "shub"):  # the migration's rows do not survive transactional tests
        Module.objects.get_or_create(name=name)
    page.goto(f"{site.url}/admin/gateway/module/")
    row = page.locator("#result_list tr", has_text="madre")
    expect(row).to_contain_text("closed (forced closed)")
    expect(page.locator("#result_list tr", has_text="shub")).to_contain_text("up ·")
    screenshot(page, "admin-modules")


def test_it_reconnects_and_resynchronises_after_the_server_restarts(
    _ws_gateway: WsGateway,
    transactional_db: None,
    gw_env: Any,
    upstream: Any,
    staff: Any,
    page: Any,
) -> None:
    from gateway.operations import registry as services
    from gateway.operations.breakers import force_breaker

    point_modules_at(gw_env, upstream)
    services.reset()
    server = WsGateway().start()
    try:
        open_dashboard(page, server.url)
        expect(card(page, "hermes")).to_have_attribute("data-breaker", "closed")
        server.stop()
        expect(page.locator("#vx-connection")).to_have_attribute("data-state", "reconnecting")
        expect(page.locator("#vx-connection")).to_contain_text("reconnecting in")

        # Changed while the dashboard is away: it never sees this transition's event.
        # (A thread of its own: Playwright keeps an event loop on this one.)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(force_breaker, "hermes", "force_open").result()
        server = WsGateway(port=server.port).start()
        expect(page.locator("#vx-connection")).to_have_attribute(
            "data-state", "live", timeout=15_000
        )
        expect(card(page, "hermes")).to_have_attribute("data-breaker", "open")
        assert page.evaluate("window.__sameDocument") is True
    finally:
        server.stop()


def test_people_without_staff_rights_cannot_open_it(site: WsGateway, page: Any) -> None:
    from django.contrib.auth.models import User

    User.objects.create_user("visitor", password="visitor-pass-0123", is_staff=False)
    page.goto(f"{site.url}/admin/dashboard/")
    assert "/admin/login/" in page.url
    page.fill("#id_username", "visitor")
    page.fill("#id_password", "visitor-pass-0123")
    page.click("input[type=submit]")
    expect(page.locator(".errornote")).to_be_visible()
    assert page.locator("#vx11-dashboard").count() == 0
