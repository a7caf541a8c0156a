"""System checks: a Redis URL the request path's connection cannot honour stops ``check``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.checks import gateway_checks
from gateway.core.conf import gw

ROOT = Path(__file__).resolve().parents[2]


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
        "redis://127.0.0.1:6379/0?ssl=true",  # TLS asked for the wrong way
        "redis://127.0.0.1:6379/0?frobnicate=1",
    ],
)
def test_a_redis_url_the_gateway_cannot_honour_is_an_error(redis_url, url: str) -> None:
    assert "gateway.E003" in redis_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/0?decode_responses=true&protocol=3",
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=none",
    ],
)
def test_a_supported_redis_url_passes(redis_url, url: str) -> None:
    assert "gateway.E003" not in redis_url(url)


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=none", True),
        ("rediss://127.0.0.1:6379/0?ssl_check_hostname=false", True),
        ("rediss://127.0.0.1:6379/0", False),
        ("redis://127.0.0.1:6379/0", False),
    ],
)
def test_tls_verification_turned_off_is_a_warning(redis_url, url: str, warned: bool) -> None:
    assert ("gateway.W006" in redis_url(url)) is warned


def test_the_server_refuses_to_start_on_a_redis_url_it_cannot_honour() -> None:
    """Not a 500 on every proxied call: the process exits at load with the reason."""
    env = {
        **os.environ,
        "DJANGO_DEBUG": "0",
        "VX11_TOKEN": "x" * 20,
        "VX11_REDIS_URL": "redis://127.0.0.1:6379/0?ssl_cert_reqs=none",
    }
    refused = subprocess.run(
        [sys.executable, "-c", "import vx11site.asgi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "refuses to start" in refused.stderr and "rediss://" in refused.stderr
    env["VX11_REDIS_URL"] = "redis://127.0.0.1:6379/0?decode_responses=true"
    loaded = subprocess.run(
        [sys.executable, "-c", "import vx11site.asgi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.returncode == 0, loaded.stderr
