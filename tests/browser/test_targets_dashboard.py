"""The dashboard lists each module's targets and keeps their state live (SPEC §14, §18):
a target whose probe fails shows ``down``, an ejected one ``ejected until …``, without a
reload; the module list's health badge says ``degraded``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from playwright.sync_api import expect

from gateway.config.modules import ModuleInfo, TargetInfo
from tests.browser.conftest import WsGateway, log_in, screenshot
from tests.conftest import GwEnv
from tests.servers import UpstreamServer

pytestmark = pytest.mark.browser


@pytest.fixture
def three() -> Iterator[list[UpstreamServer]]:
    servers = [UpstreamServer().start() for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


def key(server: UpstreamServer) -> str:
    return f"127.0.0.1:{server.port}"


async def _noop(module: str) -> None:
    return None


def probe_all(info: ModuleInfo) -> None:
    """One turn of the health worker (this thread's loop; the gateway runs on its own)."""
    from gateway.operations import events
    from gateway.operations.health import HealthChecker, probe_transport

    async def run() -> None:
        async with probe_transport() as client:
            checker = HealthChecker(client, mark_healthy=_noop)
            checker.table = {info.name: info}
            await checker.check(info)
        await events.flush()

    in_a_thread(run())


def in_a_thread(work: Any) -> None:
    """Run ``work`` on a loop of its own thread (Playwright keeps one on this thread)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, work).result()


def eject(module: str, target: str) -> None:
    """The request path's consecutive failures, as another loop of the gateway sees them."""
    from gateway.operations import events
    from gateway.operations import registry as services

    async def run() -> None:
        detector = services.get().outliers
        for _ in range(detector.cfg.consecutive_failures):
            await detector.record(module, target, failure=True, n_targets=3)
        await events.flush()
        await detector.aclose()

    in_a_thread(run())


def test_targets_show_down_and_ejected_live_and_the_module_list_says_degraded(
    site: WsGateway, staff: Any, page: Any, gw_env: GwEnv, three: list[UpstreamServer]
) -> None:
    from gateway.models import Module

    a, b, c = three
    gw_env.set(VX11_MODULE_SWITCH_URL=",".join(s.url for s in three))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    log_in(page, site.url, "/admin/dashboard/")
    expect(page.locator("#vx-connection")).to_have_attribute("data-state", "live")
    page.evaluate("window.__sameDocument = true")
    switch = page.locator('.vx-card[data-module="switch"]')
    rows = switch.locator(".vx-targets tbody tr")
    expect(rows).to_have_count(3)
    for server in three:
        expect(switch.locator(f'tr[data-target="{key(server)}"]')).to_contain_text("100")

    b.respond("GET", "/health", status=503)
    info = ModuleInfo("switch", "", targets=tuple(TargetInfo(s.url) for s in three))
    probe_all(info)
    expect(switch.locator(f'tr[data-target="{key(b)}"]')).to_have_attribute("data-state", "down")
    expect(switch.locator(f'tr[data-target="{key(a)}"]')).to_have_attribute("data-state", "up")
    expect(switch.locator('[data-field="health"]')).to_have_text("degraded")
    expect(switch.locator('[data-field="error"]')).to_contain_text("1 of 3 targets down")

    eject("switch", key(c))
    ejected = switch.locator(f'tr[data-target="{key(c)}"]')
    expect(ejected).to_have_attribute(
        "data-state", re.compile(r"^ejected until \d\d:\d\d:\d\d UTC$")
    )
    expect(ejected.locator(".vx-badge")).to_have_attribute("data-tone", "warn")
    assert page.evaluate("window.__sameDocument") is True  # all of it without a reload
    switch.scroll_into_view_if_needed()
    table, box = switch.locator(".vx-targets").bounding_box(), switch.bounding_box()
    assert table is not None and box is not None
    assert table["x"] + table["width"] <= box["x"] + box["width"], (table, box)  # no clipping
    screenshot(page, "dashboard-targets")

    Module.objects.get_or_create(name="switch")
    page.goto(f"{site.url}/admin/gateway/module/")
    row = page.locator("#result_list tr", has_text="switch")
    expect(row).to_contain_text("degraded · 1 of 3 targets down")
    assert errors == []
