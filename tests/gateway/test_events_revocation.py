"""``/ws/events`` closes a stream whose credential stops being valid (4403 within seconds)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from gateway.console.consumers import CLOSE_FORBIDDEN
from tests.gateway.test_events import HOST, ORIGIN, make_token, open_socket, staff_cookie

pytestmark = pytest.mark.django_db(transaction=True)

#: "Within a few seconds": the credential is checked again every 2 s.
FEW_SECONDS = 4.0


@pytest.fixture
def application(gw_env: Any) -> Any:
    from vx11site.asgi import application

    return application


async def closed_with(ws: Any) -> tuple[int | None, float]:
    """Wait for the server's close (other events may come first); its code and the wait."""
    started = time.monotonic()
    while time.monotonic() - started < FEW_SECONDS + 2:
        message = await ws.receive_output(timeout=FEW_SECONDS + 2)
        if message["type"] == "websocket.close":
            return int(message["code"]), time.monotonic() - started
    return None, time.monotonic() - started


def revoke_by_update(name: str) -> None:
    from gateway.models import ApiClient

    ApiClient.objects.filter(name=name).update(active=False)


def deactivate(username: str, **fields: bool) -> None:
    from django.contrib.auth.models import User

    User.objects.filter(username=username).update(**fields)


async def test_the_stream_of_a_revoked_admin_client_is_closed_4403(application: Any) -> None:
    token = await sync_to_async(make_token)("ops-robot", is_admin=True)
    ws, first = await open_socket(application, [(b"x-vx11-token", token.encode())])
    assert first["type"] == "snapshot"
    await sync_to_async(revoke_by_update)("ops-robot")
    code, waited = await closed_with(ws)
    assert code == CLOSE_FORBIDDEN and waited < FEW_SECONDS, (code, waited)


@pytest.mark.parametrize("change", [{"is_active": False}, {"is_staff": False}])
async def test_the_stream_of_a_deactivated_or_destaffed_user_is_closed_4403(
    application: Any, change: dict[str, bool]
) -> None:
    cookie = await sync_to_async(staff_cookie)()
    ws, first = await open_socket(application, [HOST, ORIGIN, cookie])
    assert first["type"] == "snapshot"
    await sync_to_async(deactivate)("ops", **change)
    code, waited = await closed_with(ws)
    assert code == CLOSE_FORBIDDEN and waited < FEW_SECONDS, (code, waited)


async def test_a_valid_stream_stays_open_across_rechecks(application: Any) -> None:
    token = await sync_to_async(make_token)("steady", is_admin=True)
    ws, _ = await open_socket(application, [(b"x-vx11-token", token.encode())])
    assert await ws.receive_nothing(timeout=3.0)  # past a re-check (every 2 s)
    await ws.disconnect()
