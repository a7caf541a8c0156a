"""The health-check worker also deletes expired Context-7 sessions on a timer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from asgiref.sync import sync_to_async

from gateway.management.commands.run_health_checks import Command
from sessions_ctx7.models import Session


def _session(session_id: str, expires_in: timedelta) -> Session:
    now = datetime.now(tz=UTC)
    return Session.objects.create(
        session_id=session_id,
        client="client:1",
        created_at=now,
        last_activity=now,
        expires_at=now + expires_in,
    )


async def test_worker_purges_expired_sessions_periodically(transactional_db, gw_env):
    gw_env.set(VX11_CONTEXT7_PURGE_INTERVAL="0.05")
    await sync_to_async(_session)("old", timedelta(seconds=-5))
    await sync_to_async(_session)("live", timedelta(hours=1))
    stop = asyncio.Event()
    task = asyncio.create_task(Command()._purge_context7(stop))
    for _ in range(100):
        await asyncio.sleep(0.02)
        left = await sync_to_async(
            lambda: sorted(Session.objects.values_list("session_id", flat=True))
        )()
        if left == ["live"]:
            break
    stop.set()
    await asyncio.wait_for(task, 2)
    assert left == ["live"]


async def test_purge_interval_zero_turns_it_off(gw_env):
    gw_env.set(VX11_CONTEXT7_PURGE_INTERVAL="0")
    # Returns at once instead of looping (no database touched, no stop needed).
    await asyncio.wait_for(Command()._purge_context7(asyncio.Event()), 1)
