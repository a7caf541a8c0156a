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

The writes of a warm turn (``insert_message``, ``recycle_message``, ``save_session``,
``save_session_if``) go further: they run on the driver's own connection (``sqlite3`` or
``psycopg``, :class:`Db`), inside Django's transaction and with Django's error wrapping,
but without its cursor wrapper, and their values are prepared by the backend's own
adapters (``adapt_datetimefield_value``, ``adapt_json_value``: what ``get_db_prep_save``
ends in for these fields) without the field machinery around them. While queries are being
logged (``DEBUG``, ``CaptureQueriesContext``) they go through Django's cursor, so they are
seen like any other query. ``tests/sessions_ctx7/test_statements.py`` checks that both ways
store the same values.

Every name in the SQL comes from the models' own metadata, quoted by the backend
(``quote_name``); values only ever travel as parameters (``%s``) — hence the ``noqa: S608``.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from json import encoder as json_encoder
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, OperationalError, connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import DateTimeField, Field, JSONField, Model

from sessions_ctx7.cache import Entry
from sessions_ctx7.models import Message, Session

LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for NOWAIT on a locked row


def table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _field(model: type[Model], name: str) -> Field[Any, Any]:
    field = model._meta.get_field(name)
    assert isinstance(field, Field)
    return field


def column(model: type[Model], name: str) -> str:
    column = _field(model, name).column
    assert column is not None
    return connection.ops.quote_name(column)


#: Set by the writer while it runs a batch: ``active``, a row another transaction holds is
#: not waited for (``FOR UPDATE NOWAIT``, PostgreSQL); the turn is run again on its own
#: instead, so the batch's other sessions never wait for that one's lock. ``fast``: the
#: batch runs warm writes without savepoints (a locked row is skipped, ``SKIP LOCKED``, and
#: the turn takes the savepoint path; any failure reruns the whole batch with savepoints).
in_batch = threading.local()


def fast_batch() -> bool:
    """True inside a writer batch whose warm writes run without savepoints."""
    return getattr(in_batch, "fast", False)


class RowBusy(Exception):
    """The session row is locked by another transaction (raised only inside a batch)."""


class Unsafe(Exception):
    """A write failed while no savepoint protected its turn: the batch must be rolled back
    and run again with one savepoint per turn (the writer does)."""


# --------------------------------------------------------------------------- the driver


def _kind(model: type[Model], name: str) -> str:
    field = _field(model, name)
    if isinstance(field, DateTimeField):
        return "datetime"
    if isinstance(field, JSONField):
        return "json"
    return "plain"


@dataclass(slots=True)
class Db:
    """This thread's database connection as the warm writes use it."""

    wrapper: BaseDatabaseWrapper
    raw: Any  # the driver's connection; None while Django logs queries
    dt: Callable[[datetime], Any]  # a DateTimeField value as the backend stores it
    json: Callable[[Any], Any]  # a JSONField value as the backend stores it
    placeholder: str

    def prep(self, model: type[Model], names: Sequence[str], values: Sequence[Any]) -> list[Any]:
        kinds = _kinds(model, tuple(names))
        return [
            value if kind == "plain" or value is None else self._adapt(kind, value)
            for kind, value in zip(kinds, values, strict=True)
        ]

    def _adapt(self, kind: str, value: Any) -> Any:
        return self.dt(value) if kind == "datetime" else self.json(value)

    def run(self, sql: str, params: Sequence[Any]) -> int:
        """Execute ``sql`` (``%s`` marks); the number of rows it touched."""
        if self.raw is None:
            with self.wrapper.cursor() as cursor:
                cursor.execute(sql, params)
                return int(cursor.rowcount)
        if self.placeholder != "%s":
            sql = _native(sql, self.placeholder)
        with self.wrapper.wrap_database_errors:
            return int(self.raw.execute(sql, params).rowcount)


@functools.cache
def _kinds(model: type[Model], names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_kind(model, name) for name in names)


@functools.cache
def _native(sql: str, placeholder: str) -> str:
    return sql.replace("%s", placeholder)


def sqlite_datetime(zone: tzinfo) -> Callable[[datetime], str]:
    """The SQLite backend's ``adapt_datetimefield_value`` (aware → naive in the connection's
    zone → ``str``) without its checks, remembering the last value: a turn prepares the same
    instant (its ``now``) for several columns."""
    last: list[Any] = [None, ""]

    def adapt(value: datetime) -> str:
        if value is last[0]:
            return str(last[1])
        if value.tzinfo is UTC and zone is UTC:  # timezone.now(): one call, "+00:00" cut off
            text = value.isoformat(" ")[:-6]
        elif value.utcoffset() is not None:
            text = str(value.astimezone(zone).replace(tzinfo=None))
        else:
            text = str(value)
        last[0], last[1] = value, text
        return text

    return adapt


def text_json() -> Callable[[Any], str]:
    """``json.dumps(value)`` (what the base backend's ``adapt_json_value`` stores), with the
    C encoder made once instead of on every call: the same text, a third of the time."""
    make = getattr(json_encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return json.dumps
    default = json.JSONEncoder().default
    encode = make(
        None, default, json_encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    return lambda value: "".join(encode(value, 0))


_local = threading.local()


def db() -> Db:
    """This thread's :class:`Db` (inside a batch, the batch's connection: the writer's, or
    the event loop's own, :mod:`sessions_ctx7.onloop`)."""
    chosen: Db | None = getattr(in_batch, "db", None)
    if chosen is not None:
        return chosen
    wrapper = getattr(in_batch, "wrapper", None) or connections[DEFAULT_DB_ALIAS]
    if wrapper.connection is None:
        wrapper.ensure_connection()
    raw = None if wrapper.queries_logged else wrapper.connection
    cached: Db | None = getattr(_local, "db", None)
    if cached is not None and cached.wrapper is wrapper and cached.raw is raw:
        return cached
    ops = wrapper.ops
    dt: Callable[[datetime], Any] = ops.adapt_datetimefield_value
    dumps: Callable[[Any], Any] = functools.partial(ops.adapt_json_value, encoder=None)
    if wrapper.vendor == "sqlite":
        if settings.USE_TZ:
            dt = sqlite_datetime(wrapper.timezone or UTC)
        dumps = text_json()
    _local.db = made = Db(wrapper, raw, dt, dumps, "?" if wrapper.vendor == "sqlite" else "%s")
    return made


# --------------------------------------------------------------------------- reading


@functools.cache
def _select_sql(vendor: str, by: str, nowait: bool) -> str:
    lock = ""
    if connection.features.has_select_for_update:
        lock = " FOR UPDATE NOWAIT" if nowait else " FOR UPDATE"
    name, key = table(Session), column(Session, by)
    return f"SELECT * FROM {name} WHERE {key} = %s LIMIT 1{lock}"  # noqa: S608


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


# --------------------------------------------------------------------------- writing

MESSAGE_FIELDS = ("session", "seq", "role", "content", "metadata", "created_at")


@functools.cache
def _insert_sql(vendor: str) -> str:
    columns = ", ".join(column(Message, name) for name in MESSAGE_FIELDS)
    marks = ", ".join(["%s"] * len(MESSAGE_FIELDS))
    return f"INSERT INTO {table(Message)} ({columns}) VALUES ({marks})"  # noqa: S608


def insert_message(
    session_pk: int, seq: int, role: str, content: str, metadata: object, created_at: datetime
) -> None:
    d = db()
    values = [session_pk, seq, role, content, d.json(metadata), d.dt(created_at)]  # MESSAGE_FIELDS
    d.run(_insert_sql(d.wrapper.vendor), values)


RECYCLED_FIELDS = ("seq", "role", "content", "metadata", "created_at")


@functools.cache
def _recycle_sql(vendor: str) -> str:
    sets = ", ".join(f"{column(Message, name)} = %s" for name in RECYCLED_FIELDS)
    return (
        f"UPDATE {table(Message)} SET {sets} "  # noqa: S608
        f"WHERE {column(Message, 'session')} = %s AND {column(Message, 'seq')} = %s"
    )


def recycle_message(
    session_pk: int,
    old_seq: int,
    seq: int,
    role: str,
    content: str,
    metadata: object,
    created_at: datetime,
) -> bool:
    """Rewrite message ``old_seq`` as the newest one (``seq``); False if there is none."""
    d = db()
    values = [seq, role, content, d.json(metadata), d.dt(created_at), session_pk, old_seq]
    return bool(d.run(_recycle_sql(d.wrapper.vendor), values))


@functools.cache
def _update_sql(vendor: str, names: tuple[str, ...]) -> str:
    sets = ", ".join(f"{column(Session, name)} = %s" for name in names)
    return f"UPDATE {table(Session)} SET {sets} WHERE {column(Session, 'id')} = %s"  # noqa: S608


def save_session(session: object, names: Sequence[str]) -> None:
    """``session.save(update_fields=names)``, without the compiler."""
    fields = tuple(names)
    d = db()
    values = d.prep(Session, fields, [getattr(session, name) for name in fields])
    pk = getattr(session, "pk")  # noqa: B009 - a Session or a cache entry
    d.run(_update_sql(d.wrapper.vendor, fields), [*values, pk])


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
def _update_if_sql(vendor: str, names: tuple[str, ...], lock: str) -> str:
    rows, pk = table(Session), column(Session, "id")
    sets = ", ".join(f"{column(Session, name)} = %s" for name in names)
    guards = " AND ".join(f"{column(Session, name)} = %s" for name in GUARD_FIELDS)
    where = f"{pk} = %s"
    if lock:  # PostgreSQL in a batch: a row another transaction holds is not waited for
        where = f"{pk} IN (SELECT {pk} FROM {rows} WHERE {pk} = %s FOR UPDATE {lock})"  # noqa: S608
    return f"UPDATE {rows} SET {sets} WHERE {where} AND {guards}"  # noqa: S608


def prep_guard(session: object) -> list[Any]:
    """The :data:`GUARD_FIELDS` of ``session`` as the database holds them."""
    return db().prep(Session, GUARD_FIELDS, [getattr(session, name) for name in GUARD_FIELDS])


def _row_lock(d: Db) -> str:
    """How a guarded write treats a row another transaction holds (PostgreSQL, in a batch)."""
    features = d.wrapper.features
    if fast_batch() and features.has_select_for_update_skip_locked:
        return "SKIP LOCKED"  # no error (which would abort a batch without savepoints)
    if getattr(in_batch, "active", False) and features.has_select_for_update_nowait:
        return "NOWAIT"
    return ""


def save_session_if(session: Entry, pk: int, guard: Sequence[Any]) -> list[Any] | None:
    """Write the :data:`GUARD_FIELDS` but ``session_id`` of ``session`` to row ``pk`` only if
    the row still holds ``guard`` (:func:`prep_guard` of what the turn was computed from;
    ``client`` and ``created_at`` are written as the guard holds them: a warm turn never
    changes them).

    Returns the new row's guard (for the next turn), None if the row changed or is gone
    (or, in a fast batch, is locked by another transaction). Raises RowBusy inside a batch
    on a row locked elsewhere."""
    fields = GUARD_FIELDS[1:]
    d = db()
    values = [
        guard[1],  # client and created_at never change on this path: as the guard holds them
        guard[2],
        d.dt(session.last_activity),
        d.dt(session.expires_at),
        session.topic,
        session.message_count,
        session.seq,
        d.json(session.recent),
    ]
    lock = _row_lock(d)
    sql = _update_if_sql(d.wrapper.vendor, fields, lock)
    try:
        if not d.run(sql, [*values, pk, *guard]):
            return None
    except OperationalError as exc:
        if lock == "NOWAIT" and getattr(exc.__cause__, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise RowBusy(str(pk)) from exc
        raise
    return [guard[0], *values]


__all__ = [
    "GUARD_FIELDS",
    "Db",
    "RowBusy",
    "Unsafe",
    "column",
    "db",
    "fast_batch",
    "in_batch",
    "insert_message",
    "lock_session",
    "prep_guard",
    "recycle_message",
    "save_session",
    "save_session_if",
    "table",
]
