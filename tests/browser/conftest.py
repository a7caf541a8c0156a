"""Real-browser fixtures: Debian's chromium driven by Playwright, a live gateway with WebSockets.

The shared ``gateway`` fixture serves HTTP only (``ws="none"``); the dashboard needs
``/ws/events``, so these tests run their own uvicorn with the ``websockets`` protocol,
on a thread of the test process, sharing the test database like the shared one.
Never ``playwright install``: the browser is the system's ``/usr/bin/chromium``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MODULE_NAMES, OPERATOR_TOKEN, GwEnv, LiveGateway, wait_until
from tests.servers import UpstreamServer

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("VX11_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STAFF_USER = "operator"
STAFF_PASSWORD = "dashboard-pass-0123"
TIMEOUT_MS = 10_000


@pytest.fixture(autouse=True)
def _orm_beside_playwright() -> Iterator[None]:
    """Playwright's sync API keeps an event loop on this thread between calls; the ORM
    calls these tests make in between are plain synchronous ones (browser tests only).

    Set by hand, not with ``monkeypatch``: ``gw_env`` undoes its monkeypatch before the
    test database is flushed.
    """
    key = "DJANGO_ALLOW_ASYNC_UNSAFE"
    previous = os.environ.get(key)
    os.environ[key] = "true"
    yield
    if previous is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = previous


class WsGateway(LiveGateway):
    """The live gateway with WebSockets on (the dashboard needs ``/ws/events``)."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(ws="websockets-sansio", port=port)


@pytest.fixture(scope="session")
def _ws_gateway(django_db_setup: None, django_db_blocker: Any) -> Iterator[WsGateway]:
    from gateway.core.conf import gw

    os.environ.setdefault("VX11_TOKEN", OPERATOR_TOKEN)
    gw.reload()
    with django_db_blocker.unblock():
        server = WsGateway().start()
    yield server
    server.stop()


def point_modules_at(gw_env: GwEnv, upstream: UpstreamServer) -> None:
    gw_env.set(**{f"VX11_MODULE_{name.upper()}_URL": upstream.url for name in MODULE_NAMES})


@pytest.fixture
def site(
    _ws_gateway: WsGateway, transactional_db: None, gw_env: GwEnv, upstream: UpstreamServer
) -> Iterator[WsGateway]:
    """The live gateway (HTTP + WebSockets); every module points at ``upstream``."""
    from gateway.operations import registry as services

    point_modules_at(gw_env, upstream)
    services.reset()  # every test starts with closed breakers and an empty cache
    yield _ws_gateway
    wait_for_no_listeners()


@pytest.fixture
def staff(transactional_db: None) -> Any:
    from django.contrib.auth.models import User

    return User.objects.create_superuser(STAFF_USER, "ops@example.com", STAFF_PASSWORD)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        # ./run test installs it when run as root; a missing browser is a failure, not a skip.
        pytest.fail(f"chromium not found at {CHROMIUM} (Debian: apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    yield tab
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / f"FAILED-{request.node.name}.png"), full_page=True)
    tab.goto("about:blank")
    context.close()
    wait_for_no_listeners()


def wait_for_no_listeners() -> None:
    """Let the server finish closing this test's sockets while the test database is open."""
    from channels.layers import get_channel_layer

    from gateway.operations.events import GROUP

    groups = getattr(get_channel_layer(), "groups", None)
    if groups is not None:
        wait_until(lambda: not groups.get(GROUP), timeout=5)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


def screenshot(page: Any, name: str, *, full_page: bool = True) -> Path:
    """Save a PNG to test-artifacts/ (git-ignored).

    With ``VX11_UPDATE_SCREENSHOTS=1`` it is copied to docs/screenshots/ too, so the
    documented pictures change only when someone means to refresh them.
    """
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    if os.environ.get("VX11_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOTS / f"{name}.png")
    return path


def log_in(page: Any, base_url: str, next_path: str = "/admin/") -> None:
    """Log in through the admin's own form, as a person would."""
    page.goto(f"{base_url}/admin/login/?next={next_path}")
    page.fill("#id_username", STAFF_USER)
    page.fill("#id_password", STAFF_PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base_url}{next_path}")
