"""The event loop's own look at a session row on SQLite: is the cached row still the stored one?

A chat turn on a session this process wrote last needs, before it goes upstream, only one
fact from the database: that nobody else changed the row since (another gateway process,
the admin's expire, the purge, a shell). On SQLite that is one indexed ``SELECT`` of the
row's columns, compared with the ones the writer committed (the cache entry's guard). In
WAL mode a reader never waits for a writer, so it runs right on the event loop, on a
connection of the loop's own: a few microseconds, no thread hop. Any trouble (the database
busy, locked, missing, or not SQLite at all) answers "unknown" and the turn takes the
writer's path, which decides as before.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS

from sessions_ctx7 import statements
from sessions_ctx7.models import Session

_local = threading.local()


def _database() -> dict[str, Any]:
    # settings.DATABASES, not ``connections[…]``: on the event loop the latter is an
    # asgiref Local lookup, several times dearer than the look at the row itself.
    database: dict[str, Any] = settings.DATABASES[DEFAULT_DB_ALIAS]
    return database


def available() -> bool:
    """True where the row can be looked at from the loop (the SQLite backend)."""
    return str(_database()["ENGINE"]).endswith(".sqlite3")


@functools.cache
def _sql() -> str:
    # Made once: ``connection.ops`` on the loop is a DatabaseWrapper built anew per task.
    columns = ", ".join(statements.column(Session, name) for name in statements.GUARD_FIELDS)
    session_id = statements.column(Session, "session_id")
    return f"SELECT {columns} FROM {statements.table(Session)} WHERE {session_id} = ?"  # noqa: S608


def _connection(database: str) -> sqlite3.Connection:
    cached: tuple[str, sqlite3.Connection] | None = getattr(_local, "connection", None)
    if cached is not None and cached[0] == database:
        return cached[1]
    if cached is not None:
        cached[1].close()
    # timeout=0: never wait for a lock on the loop (a busy database answers "unknown").
    made = sqlite3.connect(database, uri=True, timeout=0, isolation_level=None)
    made.execute("PRAGMA query_only = ON")
    _local.connection = (database, made)
    return made


def unchanged(session_id: str, guard: Sequence[Any]) -> bool:
    """The row of ``session_id`` holds, column for column, ``guard`` (False: changed, gone,
    or unknown)."""
    database = str(_database()["NAME"])
    try:
        conn = _connection(database)
        row = conn.execute(_sql(), (session_id,)).fetchone()
    except sqlite3.Error:
        close()
        return False
    return row is not None and list(row) == list(guard)


def close() -> None:
    """Forget this thread's connection (it is opened again on the next look)."""
    cached: tuple[str, sqlite3.Connection] | None = getattr(_local, "connection", None)
    _local.connection = None
    if cached is not None:
        cached[1].close()


__all__ = ["available", "close", "unchanged"]
