"""Shared fixtures: real Redis, real upstream servers, a fake clock, personas."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Self

import pytest

from tests.servers import RedisServer, UpstreamServer


class FakeClock:
    """An injected clock tests move by hand: no sleeps for timing logic."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server per test process (xdist worker)."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean Redis database for one test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis server of this test's own, which the test may stop, kill or restart."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer().start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- gateway


import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from tests.servers import free_port, wait_for_port  # noqa: E402

OPERATOR_TOKEN = "test-operator-token-0123456789"
GATEWAY_TOKEN = "test-gateway-token-0123456789"
MODULE_NAMES = (
    "madre",
    "switch",
    "hermes",
    "hormiguero",
    "manifestator",
    "mcp",
    "shub",
    "spawner",
    "operator",
)


class LiveGateway:
    """The real ASGI application served by uvicorn on a thread of the test process.

    It shares the test database (use ``transactional_db``) and process-wide
    settings, so tests change ``VX11_*`` with the ``gw_env`` fixture.
    """

    def __init__(self, ws: str = "none", port: int | None = None) -> None:
        import uvicorn

        from vx11site.asgi import application

        self.port = port or free_port()
        config = uvicorn.Config(
            application,
            host="127.0.0.1",
            port=self.port,
            lifespan="on",
            log_level="warning",
            access_log=False,
            loop="asyncio",
            proxy_headers=False,
            http="h11",
            ws=ws,
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="live-gateway")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.thread.start()
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def _live_gateway(django_db_setup, django_db_blocker) -> Iterator[LiveGateway]:
    from gateway.core.conf import gw

    os.environ.setdefault("VX11_TOKEN", OPERATOR_TOKEN)
    gw.reload()
    with django_db_blocker.unblock():
        server = LiveGateway().start()
    yield server
    server.stop()


class GwEnv:
    """Set ``VX11_*`` variables for one test; the gateway re-reads them at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch

    def set(self, **values: object) -> None:
        from gateway.config.snapshot import holder
        from gateway.core.conf import gw

        for key, value in values.items():
            if value is None:
                self.mp.delenv(key, raising=False)
            else:
                self.mp.setenv(key, str(value))
        gw.reload()
        holder.invalidate()


@pytest.fixture
def gw_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[GwEnv]:
    from gateway.config.snapshot import holder
    from gateway.core.conf import gw
    from gateway.state import store

    env = GwEnv(monkeypatch)
    env.set(
        VX11_TOKEN=OPERATOR_TOKEN,
        VX11_GATEWAY_TOKEN=GATEWAY_TOKEN,
        VX11_REDIS_URL=None,
        VX11_AUTH_ENABLED=None,
    )
    yield env
    monkeypatch.undo()
    gw.reload()
    holder.invalidate()
    store.reset()


@pytest.fixture
def gateway(
    _live_gateway: LiveGateway, transactional_db: None, gw_env: GwEnv, upstream: UpstreamServer
) -> Iterator[LiveGateway]:
    """A live gateway whose every module points at the ``upstream`` test server."""
    from gateway.operations import events

    gw_env.set(**{f"VX11_MODULE_{name.upper()}_URL": upstream.url for name in MODULE_NAMES})
    yield _live_gateway
    events.wait_idle()  # background writes finish before the test database is flushed


@pytest.fixture
def http(gateway: LiveGateway) -> Iterator[httpx.Client]:
    """A client of the live gateway (no credentials by default)."""
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


@pytest.fixture
def operator_headers() -> dict[str, str]:
    return {"X-VX11-Token": OPERATOR_TOKEN}


@pytest.fixture
def make_client(transactional_db: None):
    """Create an ApiClient; returns (client, token)."""
    from gateway.models import ApiClient

    def make(name: str = "app", *, is_admin: bool = False, **fields: object):
        client = ApiClient(name=name, is_admin=is_admin, **fields)
        token = client.set_new_token()
        client.save()
        return client, token

    return make


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``postgresql`` run only in the PostgreSQL pass (tests/runner.py):
    deselected, not skipped, on the SQLite pass."""
    if os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")):
        return
    kept = [item for item in items if item.get_closest_marker("postgresql") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept
