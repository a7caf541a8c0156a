"""A chat turn's statements, written once, without the ORM's query compiler.

Every chat call runs the same handful of statements: lock and read the session row, add a
message (or recycle the oldest one at the cap), write the session row back. Through the
ORM each of them is compiled anew on every call — a ``QuerySet`` cloned, a ``WhereNode``
built, SQL rendered — which cost more than the database work itself (py-spy on
``./run bench --intent chat``: the query compiler ≈ 35 % of the gateway's CPU, SQLite's
own ``execute`` ≈ 13 %). Here the SQL is rendered once per database vendor and the values
go through each field's own ``get_db_prep_save``, so what is stored is byte for byte what
the ORM stores (datetimes as SQLite text or PostgreSQL ``timestamptz``, JSON as the field
encodes it) and the ORM, the admin and the API read it back unchanged. Reads still build
model instances (``Manager.raw``: the fields' converters run as for any query).

The rare paths (a new session, a restart, a lowered cap) stay on the ORM.

Every name in the SQL comes from the models' own metadata, quoted by the backend
(``quote_name``); values only ever travel as parameters (``%s``) — hence the ``noqa: S608``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

from django.db import OperationalError, connection
from django.db.models import Field, Model

from sessions_ctx7.models import Message, Session

LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for NOWAIT on a locked row


def _table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _field(model: type[Model], name: str) -> Field[Any, Any]:
    field = model._meta.get_field(name)
    assert isinstance(field, Field)
    return field


def _column(model: type[Model], name: str) -> str:
    column = _field(model, name).column
    assert column is not None
    return connection.ops.quote_name(column)


#: Set by the writer while it runs a batch: a row another transaction holds is not waited
#: for (``FOR UPDATE NOWAIT``, PostgreSQL); the turn is run again on its own instead, so
#: the batch's other sessions never wait for that one's lock.
in_batch = threading.local()


class RowBusy(Exception):
    """The session row is locked by another transaction (raised only inside a batch)."""


@functools.cache
def _select_sql(vendor: str, by: str, nowait: bool) -> str:
    lock = ""
    if connection.features.has_select_for_update:
        lock = " FOR UPDATE NOWAIT" if nowait else " FOR UPDATE"
    table, column = _table(Session), _column(Session, by)
    return f"SELECT * FROM {table} WHERE {column} = %s LIMIT 1{lock}"  # noqa: S608


def lock_session(by: str, value: object) -> Session | None:
    """The session row with ``by`` (``session_id`` or ``pk``) = ``value``, locked for the
    transaction (``SELECT … FOR UPDATE``; SQLite's write lock is the transaction's own)."""
    column = "id" if by == "pk" else by
    nowait = getattr(in_batch, "active", False) and connection.features.has_select_for_update_nowait
    sql = _select_sql(connection.vendor, column, nowait)
    try:
        rows = list(Session.objects.raw(sql, [value]))
    except OperationalError as exc:
        if nowait and getattr(exc.__cause__, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise RowBusy(str(value)) from exc
        raise
    return rows[0] if rows else None


MESSAGE_FIELDS = ("session", "seq", "role", "content", "metadata", "created_at")


@functools.cache
def _insert_sql(vendor: str) -> str:
    columns = ", ".join(_column(Message, name) for name in MESSAGE_FIELDS)
    marks = ", ".join(["%s"] * len(MESSAGE_FIELDS))
    return f"INSERT INTO {_table(Message)} ({columns}) VALUES ({marks})"  # noqa: S608


def _prep(model: type[Model], names: Sequence[str], values: Sequence[object]) -> list[Any]:
    return [
        _field(model, name).get_db_prep_save(value, connection)
        for name, value in zip(names, values, strict=True)
    ]


def insert_message(
    session_pk: int, seq: int, role: str, content: str, metadata: object, created_at: object
) -> None:
    values = _prep(Message, MESSAGE_FIELDS, (session_pk, seq, role, content, metadata, created_at))
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(connection.vendor), values)


RECYCLED_FIELDS = ("seq", "role", "content", "metadata", "created_at")


@functools.cache
def _recycle_sql(vendor: str) -> str:
    sets = ", ".join(f"{_column(Message, name)} = %s" for name in RECYCLED_FIELDS)
    return (
        f"UPDATE {_table(Message)} SET {sets} "  # noqa: S608
        f"WHERE {_column(Message, 'session')} = %s AND {_column(Message, 'seq')} = %s"
    )


def recycle_message(
    session_pk: int,
    old_seq: int,
    seq: int,
    role: str,
    content: str,
    metadata: object,
    created_at: object,
) -> bool:
    """Rewrite message ``old_seq`` as the newest one (``seq``); False if there is none."""
    values = _prep(Message, RECYCLED_FIELDS, (seq, role, content, metadata, created_at))
    with connection.cursor() as cursor:
        cursor.execute(_recycle_sql(connection.vendor), [*values, session_pk, old_seq])
        return bool(cursor.rowcount)


@functools.cache
def _update_sql(vendor: str, names: tuple[str, ...]) -> str:
    sets = ", ".join(f"{_column(Session, name)} = %s" for name in names)
    return f"UPDATE {_table(Session)} SET {sets} WHERE {_column(Session, 'id')} = %s"  # noqa: S608


def save_session(session: object, names: Sequence[str]) -> None:
    """``session.save(update_fields=names)``, without the compiler."""
    fields = tuple(names)
    values = _prep(Session, fields, [getattr(session, name) for name in fields])
    pk = getattr(session, "pk")  # noqa: B009 - a Session or a cache entry
    with connection.cursor() as cursor:
        cursor.execute(_update_sql(connection.vendor, fields), [*values, pk])


#: Every column of the row a turn writes: a guarded write matches only a row that is,
#: column for column, the one the turn was computed from.
GUARD_FIELDS = (
    "session_id",
    "client",
    "created_at",
    "last_activity",
    "expires_at",
    "topic",
    "message_count",
    "seq",
    "recent",
)


@functools.cache
def _update_if_sql(vendor: str, names: tuple[str, ...], nowait: bool) -> str:
    table, pk = _table(Session), _column(Session, "id")
    sets = ", ".join(f"{_column(Session, name)} = %s" for name in names)
    guards = " AND ".join(f"{_column(Session, name)} = %s" for name in GUARD_FIELDS)
    where = f"{pk} = %s"
    if nowait:  # PostgreSQL in a batch: a row another transaction holds is not waited for
        where = f"{pk} IN (SELECT {pk} FROM {table} WHERE {pk} = %s FOR UPDATE NOWAIT)"  # noqa: S608
    return f"UPDATE {table} SET {sets} WHERE {where} AND {guards}"  # noqa: S608


def prep_guard(session: object) -> list[Any]:
    """The :data:`GUARD_FIELDS` of ``session`` as the database holds them."""
    return _prep(Session, GUARD_FIELDS, [getattr(session, name) for name in GUARD_FIELDS])


def save_session_if(session: object, pk: int, guard: Sequence[Any]) -> list[Any] | None:
    """Write the :data:`GUARD_FIELDS` but ``session_id`` of ``session`` to row ``pk`` only if
    the row still holds ``guard`` (:func:`prep_guard` of what the turn was computed from).

    Returns the new row's guard (for the next turn), None if the row changed or is gone.
    Raises RowBusy inside a batch on a row locked elsewhere."""
    fields = GUARD_FIELDS[1:]
    values = _prep(Session, fields, [getattr(session, name) for name in fields])
    nowait = getattr(in_batch, "active", False) and connection.features.has_select_for_update_nowait
    sql = _update_if_sql(connection.vendor, fields, nowait)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, [*values, pk, *guard])
            if not cursor.rowcount:
                return None
    except OperationalError as exc:
        if nowait and getattr(exc.__cause__, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise RowBusy(str(pk)) from exc
        raise
    return [guard[0], *values]


__all__ = [
    "GUARD_FIELDS",
    "RowBusy",
    "in_batch",
    "insert_message",
    "lock_session",
    "prep_guard",
    "recycle_message",
    "save_session",
    "save_session_if",
]
