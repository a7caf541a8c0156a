"""System checks: a Redis URL the request path's connection cannot honour stops ``check``."""

from __future__ import annotations

import pytest

from gateway.checks import gateway_checks
from gateway.core.conf import gw


@pytest.fixture
def redis_url(monkeypatch: pytest.MonkeyPatch):
    def use(url: str) -> list[str]:
        monkeypatch.setenv("VX11_REDIS_URL", url)
        return [m.id for m in gateway_checks() if m.id is not None]

    yield use
    monkeypatch.delenv("VX11_REDIS_URL", raising=False)
    gw.reload()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?ssl_cert_reqs=none",  # TLS options on a plain URL
        "rediss://127.0.0.1:6379/0?ssl_no_such_option=1",
        "rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/ca.pem",
        "redis://127.0.0.1:6379/0?protocol=3",
    ],
)
def test_a_redis_url_the_gateway_cannot_honour_is_an_error(redis_url, url: str) -> None:
    assert "gateway.E003" in redis_url(url)


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6379/0?ssl_cert_reqs=none"],
)
def test_a_supported_redis_url_passes(redis_url, url: str) -> None:
    assert "gateway.E003" not in redis_url(url)
