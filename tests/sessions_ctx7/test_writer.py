"""The Context-7 writer: many turns per commit, each turn on its own, order kept per session."""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections, transaction
from django.utils import timezone

from gateway.core.problems import Forbidden
from sessions_ctx7 import enrich, services
from sessions_ctx7.models import Message, Session
from sessions_ctx7.writer import Writer

pytestmark = [pytest.mark.db_backend, pytest.mark.django_db(transaction=True)]


def contents(session_id: str) -> list[str]:
    return list(
        Message.objects.filter(session__session_id=session_id)
        .order_by("seq")
        .values_list("content", flat=True)
    )


async def test_waiting_turns_share_one_transaction_and_keep_their_order() -> None:
    """While the writer is busy, the turns that arrive are committed together, in order."""
    writer = Writer()
    gate = threading.Event()
    batches: list[int] = []

    def blocker() -> None:
        gate.wait(10)

    def turn(session_id: str, text: str) -> Any:
        batches.append(id(connection.atomic_blocks[0]))  # the batch's own transaction
        return services.open_turn("client:1", session_id, text)

    first = asyncio.ensure_future(writer.run(blocker))
    await asyncio.sleep(0.05)  # the writer is now inside the first batch, waiting
    jobs = [
        writer.run(functools.partial(turn, s, f"{s} #{i}"), key=s)
        for i in range(4)
        for s in ("alpha", "beta", "gamma")
    ]
    pending = asyncio.gather(*jobs)
    await asyncio.sleep(0.05)
    gate.set()
    await first
    opened = await pending
    assert len(opened) == 12 and len(set(batches)) == 1  # one transaction for all twelve
    for session_id in ("alpha", "beta", "gamma"):
        stored = await sync_to_async(contents)(session_id)
        assert stored == [f"{session_id} #{i}" for i in range(4)]


async def test_one_turns_refusal_leaves_the_others_of_its_batch_stored() -> None:
    await sync_to_async(services.open_turn)("client:owner", "owned", "mine")
    results = await asyncio.gather(
        enrich.begin("client:1", b'{"message": "before"}', "free-1"),
        enrich.begin("client:intruder", b'{"message": "let me in"}', "owned"),
        enrich.begin("client:1", b'{"message": "after"}', "free-2"),
        return_exceptions=True,
    )
    assert isinstance(results[1], Forbidden)
    assert await sync_to_async(contents)("free-1") == ["before"]
    assert await sync_to_async(contents)("free-2") == ["after"]
    assert await sync_to_async(contents)("owned") == ["mine"]  # nothing of the intruder's


async def test_a_failed_job_reaches_its_own_caller_only() -> None:
    writer = Writer()

    def broken() -> None:
        with transaction.atomic():  # a job is atomic itself: its savepoint is rolled back
            now = timezone.now()
            Session.objects.create(
                session_id="rolled-back",
                client="client:1",
                created_at=now,
                last_activity=now,
                expires_at=now,
            )
            raise RuntimeError("boom")

    ok, failed = await asyncio.gather(
        writer.run(lambda: services.open_turn("client:1", "fine", "hello"), key="fine"),
        writer.run(broken),
        return_exceptions=True,
    )
    assert isinstance(failed, RuntimeError) and not isinstance(ok, BaseException)
    assert await sync_to_async(contents)("fine") == ["hello"]
    exists = sync_to_async(Session.objects.filter(session_id="rolled-back").exists)
    assert not await exists()


@pytest.mark.postgresql
async def test_a_locked_session_never_holds_up_another_sessions_turn() -> None:
    """Another transaction holds session A's row: B's turn is committed at once; A's two
    turns wait for the lock, then land in their order."""
    await sync_to_async(services.open_turn)("client:1", "locked-a", "a #0")
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        try:
            with transaction.atomic():
                list(Session.objects.select_for_update().filter(session_id="locked-a"))
                locked.set()
                release.wait(20)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert locked.wait(10)
    try:
        a1 = asyncio.ensure_future(enrich.begin("client:1", b'{"message": "a #1"}', "locked-a"))
        b = asyncio.ensure_future(enrich.begin("client:1", b'{"message": "b #0"}', "free-b"))
        a2 = asyncio.ensure_future(enrich.begin("client:1", b'{"message": "a #2"}', "locked-a"))
        await asyncio.wait_for(b, 5)  # not behind A's lock
        assert not a1.done() and not a2.done()
        assert await sync_to_async(contents)("free-b") == ["b #0"]
    finally:
        release.set()
        holder.join(20)
    await asyncio.wait_for(asyncio.gather(a1, a2), 20)
    assert await sync_to_async(contents)("locked-a") == ["a #0", "a #1", "a #2"]
