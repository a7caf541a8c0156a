"""The warm turn's writes on the driver's connection: the ORM's values, Django's errors, and a
batch that runs without savepoints until a write fails (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from asgiref.sync import sync_to_async
from django.db import IntegrityError, connection
from django.db.models import DateTimeField, JSONField
from django.test.utils import CaptureQueriesContext

from sessions_ctx7 import services, statements
from sessions_ctx7.cache import cache
from sessions_ctx7.models import Message, Session
from sessions_ctx7.writer import Writer

pytestmark = [pytest.mark.db_backend, pytest.mark.django_db(transaction=True)]
OWNER = "client:1"

INSTANTS = [
    datetime(2026, 12, 3, 14, 0, tzinfo=UTC),
    datetime(2026, 12, 3, 14, 0, 0, 1, tzinfo=UTC),
    datetime(2026, 12, 3, 23, 59, 59, 999999, tzinfo=ZoneInfo("Europe/Madrid")),
    datetime(1999, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
]
DOCUMENTS: list[Any] = [
    {},
    {"correlation_id": "abc", "status": 200},
    [["user", 'héllo ☃ "quoted" \\ back'], ["assistant", "\u2028 line"]],
    {"nested": {"list": [1, 2.5, None, True, "x" * 300]}},
    [],
]


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    cache.clear()


def _comparable(value: Any) -> Any:
    return getattr(value, "obj", value)  # psycopg's Jsonb wraps the document


def test_values_are_prepared_as_the_fields_prepare_them() -> None:
    connection.ensure_connection()
    d = statements.db()
    field = DateTimeField()
    for instant in INSTANTS:
        assert d.dt(instant) == field.get_db_prep_save(instant, connection), instant
        assert d.dt(instant) == d.dt(instant)  # remembered: the same answer twice
    for document in DOCUMENTS:
        ours, django = d.json(document), JSONField().get_db_prep_save(document, connection)
        assert _comparable(ours) == _comparable(django), document
        if isinstance(ours, str):
            assert ours == django  # byte for byte on SQLite: a guard compares the text


def contents(session_id: str) -> list[tuple[int, str, str]]:
    return list(
        Message.objects.filter(session__session_id=session_id)
        .order_by("seq")
        .values_list("seq", "role", "content")
    )


async def turn(writer: Writer, session_id: str, text: str) -> Any:
    return await writer.run(
        functools.partial(services.open_turn, OWNER, session_id, text), key=session_id
    )


async def test_warm_writes_read_back_through_the_orm_unchanged() -> None:
    writer = Writer()
    first = await turn(writer, "orm", "one")
    await writer.run(
        functools.partial(
            services.append,
            first.pk,
            "assistant",
            "réponse ☃",
            generation=first.generation,
            metadata={"status": 200},
        ),
        key="orm",
    )
    await turn(writer, "orm", "three")
    row = await Session.objects.aget(pk=first.pk)
    assert row.recent == [["user", "one"], ["assistant", "réponse ☃"], ["user", "three"]]
    assert (row.seq, row.message_count) == (3, 3)
    assert row.created_at == first.generation and row.last_activity >= row.created_at
    reply = await Message.objects.aget(session=row, seq=2)
    assert reply.metadata == {"status": 200} and reply.created_at <= row.last_activity
    assert await sync_to_async(contents)("orm") == [
        (1, "user", "one"),
        (2, "assistant", "réponse ☃"),
        (3, "user", "three"),
    ]


async def test_warm_writes_are_logged_while_django_logs_queries() -> None:
    writer = Writer()
    await turn(writer, "logged", "one")

    def captured() -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            services.open_turn(OWNER, "logged", "two")
        return [q["sql"] for q in queries.captured_queries]

    sqls: list[str] = await writer.run(captured, key="logged")
    assert [sql.split()[0].upper() for sql in sqls if not sql.upper().startswith("BEGIN")] == [
        "UPDATE",
        "INSERT",
    ]


async def test_a_write_failing_after_its_guarded_update_reruns_the_batch_with_savepoints() -> None:
    """Nothing half-written: the failing turn's session row is not advanced, and the turns
    that shared its batch are stored all the same."""
    writer = Writer()
    broken = await turn(writer, "broken", "one")
    await turn(writer, "fine", "one")

    def plant() -> None:  # a message where the next turn will write, the row left as it is
        Message.objects.create(
            session_id=broken.pk,
            seq=2,
            role="user",
            content="planted",
            created_at=broken.generation,
        )

    await sync_to_async(plant)()
    results = await asyncio.gather(
        turn(writer, "fine", "two"),
        turn(writer, "broken", "two"),
        turn(writer, "fine", "three"),
        return_exceptions=True,
    )
    assert isinstance(results[1], IntegrityError), results
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    assert await sync_to_async(contents)("fine") == [
        (1, "user", "one"),
        (2, "user", "two"),
        (3, "user", "three"),
    ]
    assert await sync_to_async(contents)("broken") == [(1, "user", "one"), (2, "user", "planted")]
    row = await Session.objects.aget(pk=broken.pk)
    assert (row.seq, row.message_count, row.recent) == (1, 1, [["user", "one"]])
