"""ReDoc and Swagger UI in a real browser load nothing from outside the gateway (SPEC §15).

Every request the page makes (scripts, styles, fonts, images, the schema, workers) is
recorded; each must go to the gateway's own origin (inline ``data:``/``blob:`` URLs are
not requests to anyone). The page must render the schema, and no Content-Security-Policy
violation may be reported (the policy would hide a blocked external fetch).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser.conftest import WsGateway, screenshot

pytestmark = pytest.mark.browser


def visit(page: Any, url: str) -> tuple[list[str], list[str]]:
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on(
        "console",
        lambda message: problems.append(message.text) if message.type == "error" else None,
    )
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "response",
        lambda response: (
            problems.append(f"{response.status} {response.url}") if response.status >= 400 else None
        ),
    )
    page.goto(url, wait_until="networkidle")
    return requests, problems


def foreign(requests: list[str], base: str) -> list[str]:
    origin = urlsplit(base).netloc
    return [
        url
        for url in requests
        if urlsplit(url).scheme not in ("data", "blob") and urlsplit(url).netloc != origin
    ]


def test_redoc_renders_and_loads_everything_from_the_gateway(site: WsGateway, page: Any) -> None:
    requests, problems = visit(page, site.url + "/redoc")
    page.wait_for_selector("h1:has-text('VX11 Gateway')")
    page.locator("h2", has_text="Proxy an intent to its module").wait_for()
    screenshot(page, "redoc", full_page=False)
    assert foreign(requests, site.url) == [], requests
    page.wait_for_selector("img[alt='redocly logo']")  # the footer's logo, now inline
    assert site.url + "/openapi.json" in requests
    assert site.url + "/redoc/redoc.standalone.js" in requests
    assert problems == [], problems


def test_swagger_ui_renders_and_loads_everything_from_the_gateway(
    site: WsGateway, page: Any
) -> None:
    requests, problems = visit(page, site.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title:has-text('VX11 Gateway')")
    page.wait_for_selector(".opblock-summary-path:has-text('/vx11/routes')")
    screenshot(page, "swagger", full_page=False)
    assert foreign(requests, site.url) == [], requests
    assert site.url + "/openapi.json" in requests
    assert problems == [], problems
