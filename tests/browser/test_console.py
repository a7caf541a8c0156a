"""The console at 1280 × 800 in a real browser (SPEC §14): every admin list and the
dashboard fit without horizontal overflow and without console errors; the graphs show
traffic summed over two gateway processes sharing one Redis.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from tests.browser.conftest import (
    STAFF_PASSWORD,
    STAFF_USER,
    TIMEOUT_MS,
    WsGateway,
    log_in,
    screenshot,
)
from tests.conftest import OPERATOR_TOKEN, wait_until
from tests.gateway.test_cross_process import embedded_env, manage
from tests.servers import GatewayProcess, UpstreamServer

VIEWPORT = {"width": 1280, "height": 800}

#: Horizontal overflow: the document, or any table wider than the box that holds it.
OVERFLOW_JS = """() => {
  const bad = [];
  const d = document.documentElement;
  if (d.scrollWidth > d.clientWidth) bad.push(`document ${d.scrollWidth} > ${d.clientWidth}`);
  document.querySelectorAll('table').forEach((t) => {
    const box = t.parentElement;
    const width = Math.ceil(t.getBoundingClientRect().width);
    if (width > box.clientWidth + 1) bad.push(`table#${t.id || '?'} ${width} > ${box.clientWidth}`);
  });
  return bad;
}"""


@pytest.fixture
def wide_page(browser: Any) -> Iterator[tuple[Any, list[str]]]:
    """A 1280 × 800 tab and the console errors and page errors it logs."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    tab.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    yield tab, errors
    context.close()


def _sessions() -> None:
    from django.utils import timezone

    from sessions_ctx7.models import Session

    now = timezone.now()
    for i in range(3):
        Session.objects.create(
            session_id=f"ctx7-{'long-session-identifier-' * 4}{i}",
            client="client:operator-application-with-a-long-name-" + "x" * 40,
            created_at=now,
            last_activity=now,
            expires_at=now + timedelta(hours=i - 1),
            topic="general",
            message_count=12 + i,
        )


def test_every_admin_list_and_the_dashboard_fit_1280(
    site: WsGateway, staff: Any, wide_page: tuple[Any, list[str]]
) -> None:
    from django.contrib import admin
    from django.urls import reverse

    page, errors = wide_page
    _sessions()
    log_in(page, site.url)
    lists = [
        reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        for model in admin.site._registry
    ]
    assert len(lists) >= 5
    problems: dict[str, list[str]] = {}
    for path in [*lists, "/admin/", reverse("admin:dashboard")]:
        page.goto(site.url + path)
        page.wait_for_load_state("networkidle")
        assert "VX11 Gateway" in page.title(), path
        assert "Django administration" not in page.content(), path
        found = page.evaluate(OVERFLOW_JS)
        if found:
            problems[path] = found
        if path.endswith("/session/"):
            screenshot(page, "admin-sessions")
    assert problems == {}
    assert errors == []
    assert page.locator("#site-name").inner_text() == "VX11 Gateway"


def _rps_total(page: Any, module: str) -> int:
    """Requests in the module's requests/s chart, read from Chart.js' own dataset."""
    return int(
        page.evaluate(
            """(m) => {
              const c = document.querySelector(`.vx-card[data-module="${m}"] canvas[data-chart="rps"]`);
              const chart = window.Chart.getChart(c);
              if (!chart) return -1;
              return Math.round(chart.data.datasets[0].data.reduce((a, b) => a + (b || 0), 0) * 10);
            }""",
            module,
        )
    )


def test_graphs_sum_two_processes_sharing_redis(
    upstream: UpstreamServer, redis_url: str, browser: Any
) -> None:
    env = embedded_env(upstream, VX11_REDIS_URL=redis_url)
    manage(
        {**env, "DJANGO_SUPERUSER_PASSWORD": STAFF_PASSWORD},
        "createsuperuser",
        "--noinput",
        "--username",
        STAFF_USER,
        "--email",
        "ops@example.com",
    )
    one = GatewayProcess(env, server_args=("--loop", "asyncio")).start()
    two = GatewayProcess(env, server_args=("--loop", "asyncio")).start()
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        headers = {"X-VX11-Token": OPERATOR_TOKEN}
        for gateway, count in ((one, 7), (two, 5)):
            with httpx.Client(base_url=gateway.url, timeout=10) as client:
                for _ in range(count):
                    assert (
                        client.post("/vx11/route/task", json={}, headers=headers).status_code == 200
                    )
        with httpx.Client(base_url=one.url, timeout=10) as client:

            def summed() -> bool:
                body: dict[str, Any] = client.get("/vx11/traffic", headers=headers).json()
                switch = body["modules"].get("switch", {})
                return bool(switch.get("totals", {}).get("requests") == 12)

            wait_until(summed, timeout=10)  # each process flushes every ~2 s
        log_in(page, one.url, "/admin/dashboard/")
        card = page.locator('.vx-card[data-module="switch"]')
        wait_until(lambda: card.get_attribute("data-requests") == "12", timeout=10)
        assert page.locator("#vx11-dashboard").get_attribute("data-traffic-shared") == "yes"
        assert _rps_total(page, "switch") == 12
        assert page.evaluate(OVERFLOW_JS) == []
        page.goto(one.url + "/")
        assert page.url.endswith("/admin/dashboard/")  # staff: / leads to the dashboard
        page.wait_for_load_state("networkidle")
        wait_until(lambda: card.get_attribute("data-requests") == "12", timeout=10)
        screenshot(page, "dashboard-graphs")
        assert errors == []
    finally:
        context.close()
        one.stop()
        two.stop()
        if os.environ.get("VX11_KEEP_LOGS") != "1":
            for gateway in (one, two):
                os.unlink(gateway.log.name)
