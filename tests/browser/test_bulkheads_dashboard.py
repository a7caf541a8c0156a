"""The dashboard shows each module's bulkhead (in flight / cap) and keeps it current."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import WsGateway, log_in
from tests.conftest import OPERATOR_TOKEN, GwEnv, wait_until
from tests.gateway.test_bulkheads import Gate

pytestmark = pytest.mark.browser

OPERATOR = {"X-VX11-Token": OPERATOR_TOKEN}


def test_in_flight_over_the_cap_updates_without_a_reload(
    site: WsGateway, staff: Any, upstream: Any, page: Any, gw_env: GwEnv
) -> None:
    gw_env.set(VX11_RATE_LIMIT_ENABLED="false", VX11_MODULE_SPAWNER_MAX_CONCURRENT="2")
    gate = Gate()
    upstream.route("POST", "/spawn", gate.handler())
    log_in(page, site.url, "/admin/dashboard/")
    spawner = page.locator('.vx-card[data-module="spawner"] [data-field="bulkhead"]')
    expect(spawner).to_have_text("0 / 2")
    expect(page.locator('.vx-card[data-module="switch"] [data-field="bulkhead"]')).to_have_text(
        "no cap of its own"
    )

    def spawn(_: int) -> int:
        with httpx.Client(base_url=site.url, headers=OPERATOR, timeout=30) as http:
            return http.post("/vx11/route/spawn", json={}).status_code

    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(spawn, i) for i in range(3)]
        assert wait_until(lambda: gate.held == 2)
        expect(spawner).to_have_text("2 / 2 · 1 queued", timeout=10_000)  # the next poll
        gate.release()
        assert [c.result() for c in calls] == [200] * 3
    expect(spawner).to_have_text("0 / 2", timeout=10_000)
