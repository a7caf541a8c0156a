"""``/ws/events``: who may listen, the snapshot first, then every gateway event."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from gateway.console.consumers import CLOSE_AUTH_REQUIRED, CLOSE_FORBIDDEN
from gateway.operations import events
from gateway.operations import registry as services
from tests.conftest import MODULE_NAMES, OPERATOR_TOKEN

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"http://testserver")
HOST = (b"host", b"testserver")


@pytest.fixture
def application(gw_env: Any) -> Any:
    from vx11site.asgi import application

    services.reset()
    return application


def communicator(app: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return WebsocketCommunicator(app, "/ws/events", headers=headers or [])


async def open_socket(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[Any, dict[str, Any]]:
    """Connect, expect acceptance and the snapshot; return both."""
    ws = communicator(app, headers)
    connected, _ = await ws.connect(timeout=5)
    assert connected
    first = await ws.receive_json_from(timeout=5)
    return ws, first


async def close_code(app: Any, headers: list[tuple[bytes, bytes]]) -> int | None:
    ws = communicator(app, headers)
    connected, code = await ws.connect(timeout=5)
    if not connected:
        return int(code)
    message = await ws.receive_output(timeout=5)
    await ws.wait()
    assert message["type"] == "websocket.close", message
    return int(message["code"])


def staff_cookie(*, is_staff: bool = True, username: str = "ops") -> tuple[bytes, bytes]:
    from django.contrib.auth.models import User

    user = User.objects.create_user(username, password="pw-123456789", is_staff=is_staff)
    client = Client()
    client.force_login(user)
    session = client.cookies["sessionid"].value
    return (b"cookie", f"sessionid={session}".encode())


def make_token(name: str, *, is_admin: bool) -> str:
    from gateway.models import ApiClient

    client = ApiClient(name=name, is_admin=is_admin)
    token = client.set_new_token()
    client.save()
    return token


# --------------------------------------------------------------------------- who may listen


async def test_no_credentials_is_closed_with_4401(application: Any) -> None:
    assert await close_code(application, [HOST, ORIGIN]) == CLOSE_AUTH_REQUIRED


async def test_wrong_token_is_closed_with_4403(application: Any) -> None:
    assert await close_code(application, [(b"x-vx11-token", b"nope")]) == CLOSE_FORBIDDEN


async def test_non_admin_client_token_is_closed_with_4403(application: Any) -> None:
    token = await sync_to_async(make_token)("reader", is_admin=False)
    assert await close_code(application, [(b"x-vx11-token", token.encode())]) == CLOSE_FORBIDDEN


async def test_session_of_a_non_staff_user_is_closed_with_4403(application: Any) -> None:
    cookie = await sync_to_async(staff_cookie)(is_staff=False)
    assert await close_code(application, [HOST, ORIGIN, cookie]) == CLOSE_FORBIDDEN


async def test_staff_session_from_a_foreign_origin_is_closed_with_4403(application: Any) -> None:
    cookie = await sync_to_async(staff_cookie)()
    evil = (b"origin", b"http://evil.example")
    assert await close_code(application, [HOST, evil, cookie]) == CLOSE_FORBIDDEN
    assert await close_code(application, [HOST, cookie]) == CLOSE_FORBIDDEN


async def test_operator_token_gets_the_snapshot_first(application: Any) -> None:
    ws, first = await open_socket(application, [(b"x-vx11-token", OPERATOR_TOKEN.encode())])
    assert first["type"] == "snapshot"
    assert set(MODULE_NAMES) <= set(first["breakers"]) == set(first["modules"])
    assert first["breakers"]["switch"] == {
        "state": "closed",
        "failure_count": 0,
        "last_failure": None,
        "opened_at": None,
        "retry_after": 0,
        "forced": None,
    }
    assert first["modules"]["switch"]["status"] == "unknown"
    assert first["modules"]["switch"]["url"].startswith("http://")
    assert isinstance(first["time"], float)
    await ws.disconnect()


async def test_admin_client_bearer_token_is_accepted(application: Any) -> None:
    token = await sync_to_async(make_token)("ops-robot", is_admin=True)
    ws, first = await open_socket(application, [(b"authorization", f"Bearer {token}".encode())])
    assert first["type"] == "snapshot"
    await ws.disconnect()


async def test_staff_session_from_our_own_page_is_accepted(application: Any) -> None:
    cookie = await sync_to_async(staff_cookie)()
    ws, first = await open_socket(application, [HOST, ORIGIN, cookie])
    assert first["type"] == "snapshot"
    await ws.disconnect()


async def test_other_websocket_paths_are_refused(application: Any) -> None:
    ws = WebsocketCommunicator(
        application, "/ws/other", headers=[(b"x-vx11-token", OPERATOR_TOKEN.encode())]
    )
    connected, _ = await ws.connect(timeout=5)
    assert not connected


# --------------------------------------------------------------------------- what it says


async def test_snapshot_carries_stored_health_and_live_breaker_state(application: Any) -> None:
    from gateway.models import ModuleHealth

    checked = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    await ModuleHealth.objects.acreate(
        module="hermes",
        status="down",
        latency_ms=12.5,
        last_check=checked,
        consecutive_failures=4,
        last_error="connect refused",
    )
    await services.get().breaker.force("madre", "force_open")
    await events.flush()
    ws, first = await open_socket(application, [(b"x-vx11-token", OPERATOR_TOKEN.encode())])
    hermes = first["modules"]["hermes"]
    assert (hermes["status"], hermes["latency_ms"], hermes["consecutive_failures"]) == (
        "down",
        12.5,
        4,
    )
    assert hermes["last_check"] == checked.timestamp()
    assert hermes["last_error"] == "connect refused"
    assert first["breakers"]["madre"]["state"] == "open"
    assert first["breakers"]["madre"]["forced"] == "open"
    await ws.disconnect()


async def test_breaker_transitions_are_forwarded_with_the_current_breaker(
    application: Any,
) -> None:
    ws, _ = await open_socket(application, [(b"x-vx11-token", OPERATOR_TOKEN.encode())])
    breaker = services.get().breaker
    for _ in range(3):
        await breaker.record("switch", status=503, error=False)
    event = await ws.receive_json_from(timeout=5)
    assert event["type"] == "breaker.transition"
    assert (event["module"], event["from"], event["to"]) == ("switch", "closed", "open")
    assert event["breaker"]["state"] == "open"
    assert event["breaker"]["failure_count"] == 3
    await breaker.force("switch", "reset")
    event = await ws.receive_json_from(timeout=5)
    assert (event["to"], event["reason"], event["breaker"]["failure_count"]) == (
        "closed",
        "reset",
        0,
    )
    await ws.disconnect()


async def test_health_and_cache_events_are_forwarded_as_published(application: Any) -> None:
    ws, _ = await open_socket(application, [(b"x-vx11-token", OPERATOR_TOKEN.encode())])
    events.emit({"type": "module.health", "module": "shub", "status": "down", "latency_ms": None})
    events.emit({"type": "cache.cleared", "keys_deleted": 2})
    got = [await ws.receive_json_from(timeout=5), await ws.receive_json_from(timeout=5)]
    assert [e["type"] for e in got] == ["module.health", "cache.cleared"]
    assert got[0]["module"] == "shub" and got[0]["status"] == "down"
    assert got[1]["keys_deleted"] == 2 and isinstance(got[1]["time"], float)
    await ws.disconnect()


async def test_saving_and_deleting_a_route_is_announced(application: Any) -> None:
    from gateway.models import Route

    ws, _ = await open_socket(application, [(b"x-vx11-token", OPERATOR_TOKEN.encode())])
    route = await Route.objects.acreate(intent="chat", timeout=3)
    event = await ws.receive_json_from(timeout=5)
    assert (event["type"], event["intent"], event["action"]) == ("route.changed", "chat", "saved")
    await route.adelete()
    event = await ws.receive_json_from(timeout=5)
    assert (event["type"], event["action"]) == ("route.changed", "deleted")
    await ws.disconnect()


async def test_health_stored_by_another_process_reaches_in_process_listeners(
    application: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.console.consumers import EventsConsumer
    from gateway.models import ModuleHealth

    monkeypatch.setattr(EventsConsumer, "health_poll_seconds", 0.05)
    ws, _ = await open_socket(application, [(b"x-vx11-token", OPERATOR_TOKEN.encode())])
    # Written straight to the table, as the health worker's process does: no event here.
    await ModuleHealth.objects.acreate(module="operator", status="up", latency_ms=3.0)
    event = await ws.receive_json_from(timeout=5)
    assert (event["type"], event["module"], event["status"], event["latency_ms"]) == (
        "module.health",
        "operator",
        "up",
        3.0,
    )
    assert await ws.receive_nothing(timeout=0.3)  # sent once, not on every poll
    await ws.disconnect()


async def test_a_client_can_ask_for_a_fresh_snapshot(application: Any) -> None:
    ws, first = await open_socket(application, [(b"x-vx11-token", OPERATOR_TOKEN.encode())])
    assert first["breakers"]["spawner"]["failure_count"] == 0
    await services.get().breaker.record("spawner", status=500, error=False)
    await ws.send_to(text_data="not json")  # ignored, the socket stays usable
    await ws.send_to(bytes_data=b"\x00")
    await ws.send_json_to({"type": "snapshot"})
    again = await ws.receive_json_from(timeout=5)
    assert again["type"] == "snapshot"
    assert again["breakers"]["spawner"]["failure_count"] == 1
    await ws.disconnect()


async def test_refused_listeners_receive_no_events(application: Any) -> None:
    ws = communicator(application, [(b"x-vx11-token", b"wrong")])
    await ws.connect(timeout=5)
    closed = await ws.receive_output(timeout=5)
    assert closed["code"] == CLOSE_FORBIDDEN
    events.emit({"type": "cache.cleared", "keys_deleted": 0})
    await events.flush()
    assert await ws.receive_nothing(timeout=0.2)


# --------------------------------------------------------------------------- Redis layer

PUBLISH = """
import asyncio, sys
from channels_redis.core import RedisChannelLayer

async def main():
    layer = RedisChannelLayer(hosts=[sys.argv[1]], prefix="vx11:ch")
    await layer.group_send("vx11.events", {"type": "gateway.event",
        "event": {"type": "module.health", "module": "mcp", "status": "up"}})
    await layer.close_pools()

asyncio.run(main())
"""


async def test_events_from_another_process_arrive_through_redis(
    application: Any, redis_url: str, settings: Any
) -> None:
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [redis_url], "prefix": "vx11:ch"},
        }
    }
    ws, _ = await open_socket(application, [(b"x-vx11-token", OPERATOR_TOKEN.encode())])
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", PUBLISH, redis_url], capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr.decode()
    event = await ws.receive_json_from(timeout=5)
    assert event == {"type": "module.health", "module": "mcp", "status": "up"}
    await ws.disconnect()
