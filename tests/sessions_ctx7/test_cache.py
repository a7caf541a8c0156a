"""The writer's session cache: a warm turn reads nothing, and any other write is seen."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from gateway.core.problems import Forbidden
from sessions_ctx7 import services
from sessions_ctx7.cache import Cache, Entry, cache
from sessions_ctx7.models import Message, Session
from sessions_ctx7.writer import Writer

pytestmark = [pytest.mark.db_backend, pytest.mark.django_db(transaction=True)]
OWNER = "client:1"


def contents(session_id: str) -> list[tuple[int, str]]:
    return list(
        Message.objects.filter(session__session_id=session_id)
        .order_by("seq")
        .values_list("seq", "content")
    )


async def turn(writer: Writer, session_id: str, text: str, owner: str = OWNER) -> Any:
    return await writer.run(
        functools.partial(services.open_turn, owner, session_id, text), key=session_id
    )


def elsewhere[T](fn: Callable[[], T]) -> Any:
    """Run ``fn`` outside the writer (no cache): what another gateway process does."""
    return sync_to_async(fn, thread_sensitive=False)()


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    cache.clear()


async def test_a_warm_turn_does_not_read_the_session_row() -> None:
    writer = Writer()
    await turn(writer, "warm", "one")
    await turn(writer, "warm", "two")

    def captured() -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            services.open_turn(OWNER, "warm", "three")
        return [q["sql"] for q in queries.captured_queries]

    sqls: list[str] = await writer.run(captured, key="warm")
    assert not [sql for sql in sqls if sql.lstrip().upper().startswith("SELECT")], sqls
    assert sum(sql.lstrip().upper().startswith(("UPDATE", "INSERT")) for sql in sqls) == 2
    stored = await sync_to_async(contents)("warm")
    assert stored == [(1, "one"), (2, "two"), (3, "three")]


async def test_a_write_from_elsewhere_is_seen_by_the_next_turn() -> None:
    writer = Writer()
    first = await turn(writer, "shared", "one")
    await turn(writer, "shared", "two")
    await elsewhere(
        lambda: services.append(
            first.pk, "assistant", "from elsewhere", generation=first.generation
        )
    )
    opened = await turn(writer, "shared", "three")
    assert "assistant: from elsewhere" in opened.summary
    stored = await sync_to_async(contents)("shared")
    assert stored == [(1, "one"), (2, "two"), (3, "from elsewhere"), (4, "three")]
    row = await Session.objects.aget(pk=first.pk)
    assert (row.seq, row.message_count) == (4, 4)


async def test_an_admin_expire_between_turns_is_honoured() -> None:
    writer = Writer()
    first = await turn(writer, "ended", "one")
    await turn(writer, "ended", "two")
    assert await elsewhere(lambda: services.expire_now([first.pk])) == 1
    opened = await turn(writer, "ended", "three")
    assert opened.restarted and opened.summary == "user: three"
    assert await sync_to_async(contents)("ended") == [(3, "three")]  # numbers go on


async def test_a_session_restarted_elsewhere_for_another_owner_is_forbidden() -> None:
    writer = Writer()
    first = await turn(writer, "taken", "one")

    def take_over() -> None:
        services.expire_now([first.pk])
        services.open_turn("client:2", "taken", "mine now")

    await elsewhere(take_over)
    with pytest.raises(Forbidden):
        await turn(writer, "taken", "two")
    assert await sync_to_async(contents)("taken") == [(2, "mine now")]  # numbers go on


async def test_a_rolled_back_job_leaves_no_trace_in_the_cache() -> None:
    writer = Writer()
    await turn(writer, "undo", "one")

    def fails() -> None:
        with transaction.atomic():
            services.open_turn(OWNER, "undo", "rolled back")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await writer.run(fails, key="undo")
    opened = await turn(writer, "undo", "two")
    assert opened.summary == "user: one\nuser: two"
    assert await sync_to_async(contents)("undo") == [(1, "one"), (2, "two")]


async def test_the_cap_holds_on_warm_turns(gw_env: Any) -> None:
    gw_env.set(VX11_CONTEXT7_MAX_MESSAGES=3)
    writer = Writer()
    for i in range(7):
        await turn(writer, "capped", f"m{i}")
    assert await sync_to_async(contents)("capped") == [(5, "m4"), (6, "m5"), (7, "m6")]
    row = await Session.objects.aget(session_id="capped")
    assert (row.seq, row.message_count) == (7, 3)


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    small = Cache(max_entries=2)
    when = datetime(2026, 12, 2)

    def entry(pk: int) -> Entry:
        return Entry(pk, f"s{pk}", OWNER, when, when, when, "general", 0, 0, [])

    small.begin()
    for pk in (1, 2):
        small.stage(entry(pk))
    small.end(committed=True)
    assert small.get("s1") is not None  # s1 is now the most recently used
    small.begin()
    small.stage(entry(3))
    small.end(committed=True)
    assert len(small) == 2 and small.get("s2") is None and small.get_pk(1) is not None
    small.begin()
    small.stage(entry(4))
    small.end(committed=False)  # a failed commit records nothing
    assert small.get("s4") is None
