"""Warm Context-7 turns on the event loop's own SQLite connection: no thread hop at all.

A chat turn on a session this process wrote last needs two things from the database: before
it goes upstream, the fact that nobody else changed the row since (another gateway process,
the admin's expire, the purge, a shell); after the answer, its two messages written. On
SQLite both are cheap — an indexed ``SELECT``, and one guarded ``UPDATE`` plus two
``INSERT`` s in WAL mode with ``synchronous=NORMAL`` (no fsync at commit) — far cheaper than
handing them to a thread: with the writer thread doing them, the event loop's own work per
request grew by ~60 % (GIL hand-offs; ``docs/PERFORMANCE.md``). So they run right on the loop,
on a connection of the loop's own:

- :func:`unchanged` compares the row with the columns the cache remembers;
- :class:`LoopWriter` collects the turns answered during one pass of the loop and writes
  them in **one** transaction at the end of it (group commit, like the writer thread's), then
  answers them: a reply reaches its client only after the commit that holds its turn.

The loop never waits for a lock: the connection has ``timeout=0``. A database that is busy
(another process or the writer thread in a transaction), a row that changed, anything that
needs a read or the ORM, any error: the turns of that pass go to the writer thread
(:mod:`sessions_ctx7.writer`), which decides as before; so do later turns of a session that
has turns waiting there, so one session's turns keep their order. With ``DEBUG`` on (queries
logged) or another database than SQLite, everything goes to the writer thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from django.conf import settings
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, connections

from gateway.core.conf import gw
from sessions_ctx7 import services, statements, turns
from sessions_ctx7.cache import cache
from sessions_ctx7.checkpoint import Checkpointer, checkpointer
from sessions_ctx7.models import Session
from sessions_ctx7.services import Opened
from sessions_ctx7.topics import classify_topic
from sessions_ctx7.warm import Push, snippet
from sessions_ctx7.writer import writer

log = logging.getLogger("sessions_ctx7")
_local = threading.local()
#: Rows remembered as checked, per loop connection (then forgotten all at once).
MAX_KNOWN = 10_000
#: Seconds a warm turn's session must outlive the turn's deadline (its write included).
EXPIRY_MARGIN = 30.0


@functools.cache
def _database() -> dict[str, Any]:
    # settings.DATABASES, not ``connections[…]``: on the event loop the latter builds a new
    # DatabaseWrapper per task, several times dearer than the look at the row itself.
    # Remembered (the lazy settings object costs ~1 µs a look) until a setting changes.
    return cast("dict[str, Any]", settings.DATABASES[DEFAULT_DB_ALIAS])


@functools.cache
def available() -> bool:
    """True where turns can be checked and written on the loop (SQLite, queries not logged)."""
    return str(_database()["ENGINE"]).endswith(".sqlite3") and not settings.DEBUG


def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in ("DATABASES", "DEBUG"):
        _database.cache_clear()
        available.cache_clear()


setting_changed.connect(_settings_changed, dispatch_uid="sessions_ctx7.onloop")


@functools.cache
def _sql() -> str:
    # Made once: ``connection.ops`` on the loop is a DatabaseWrapper built anew per task.
    columns = ", ".join(statements.column(Session, name) for name in statements.GUARD_FIELDS)
    session_id = statements.column(Session, "session_id")
    return f"SELECT {columns} FROM {statements.table(Session)} WHERE {session_id} = ?"  # noqa: S608


@dataclass(slots=True)
class _Loop:
    """This thread's connection, and the :class:`~sessions_ctx7.statements.Db` over it."""

    database: str
    raw: sqlite3.Connection
    db: statements.Db
    #: Rows known to be as cached: session id → (the cached guard, ``PRAGMA data_version``
    #: then). While no other connection commits, data_version stays and no look is needed.
    known: dict[str, tuple[Sequence[Any], int]] = field(default_factory=dict)
    #: :meth:`version` as read during the loop's current pass (None: not read yet).
    seen: int | None = None

    def version(self) -> int:
        """``PRAGMA data_version`` as of this pass of the event loop: it changes only when
        another connection commits. Read once per pass rather than once per turn (≈ 4 % of
        the loop's time at 32 sessions). Still read after every request that uses it was
        read off its socket: a request's task first runs in the pass after the one that
        read it, and the value is forgotten first thing in each pass (:meth:`note`). A row
        changed after the look is caught, as before, by the guarded write after the answer."""
        seen = self.seen
        if seen is None:
            seen = self.read_version()
            self.note(seen)
        return seen

    def read_version(self) -> int:
        return int(self.raw.execute("PRAGMA data_version").fetchone()[0])

    def note(self, version: int) -> None:
        """Remember ``version`` (read just now) until the loop's next pass begins."""
        if self.seen is None:
            try:
                asyncio.get_running_loop().call_soon(self._forget)
            except RuntimeError:  # not on an event loop: no pass to remember it for
                return
        self.seen = version

    def _forget(self) -> None:
        # Scheduled during a pass, so it runs in the next one before anything that pass
        # polls for: asyncio runs the I/O callbacks after the ready ones, uvloop (libuv)
        # runs the ready ones in its idle phase, before polling.
        self.seen = None

    def remember(self, session_id: str, guard: Sequence[Any], version: int) -> None:
        if len(self.known) >= MAX_KNOWN:
            self.known.clear()
        self.known[session_id] = (guard, version)


def _loop() -> _Loop:
    database = str(_database()["NAME"])
    cached: _Loop | None = getattr(_local, "loop", None)
    if cached is not None and cached.database == database:
        return cached
    close()
    # timeout=0: never wait for a lock on the loop (busy → the writer thread does it);
    # isolation_level=None: transactions are this module's own BEGIN/COMMIT.
    raw = sqlite3.connect(database, uri=True, timeout=0, isolation_level=None)
    try:
        raw.execute("PRAGMA synchronous = NORMAL")  # as the Django connection's init_command
        raw.execute("PRAGMA foreign_keys = ON")  # as Django's SQLite backend
        raw.execute("PRAGMA wal_autocheckpoint = 0")  # its fsyncs run in a thread (Checkpointer)
    except BaseException:
        raw.close()
        raise
    wrapper = connections.create_connection(DEFAULT_DB_ALIAS)  # vendor, errors; never opened
    zone = wrapper.timezone or UTC
    db = statements.Db(wrapper, raw, statements.sqlite_datetime(zone), statements.text_json(), "?")
    _local.loop = made = _Loop(database, raw, db)
    return made


def unchanged(session_id: str, guard: Sequence[Any]) -> bool:
    """The row of ``session_id`` holds, column for column, ``guard`` (False: changed, gone,
    or unknown)."""
    try:
        here = _loop()
        version = here.version()
        known = here.known.get(session_id)
        if known is not None and known[0] is guard and known[1] == version:
            return True  # nobody else committed since this very row was known
        row = here.raw.execute(_sql(), (session_id,)).fetchone()
    except sqlite3.Error:
        close()
        return False
    if row is None or list(row) != list(guard):
        return False
    here.remember(session_id, guard, version)
    return True


def begin_warm(
    owner: str,
    session_id: str,
    content: str | None,
    now: datetime,
    metadata: dict[str, Any],
    budget: float,
) -> tuple[Opened, turns.Pending] | None:
    """The turn as ``open_turn`` would open it, from the cache and a look at the row; None
    when that cannot be decided here (unknown session, someone else's, expired, changed).

    ``budget``: the seconds the turn may take until it is written (the route's deadline).
    ``open_turn`` refreshes the expiry when a turn begins; a warm turn writes it only at
    its end, so it is warm only while the stored expiry outlasts the turn by
    :data:`EXPIRY_MARGIN`: nobody (another client naming the session, the purge) can then
    find the session expired while the module answers. Closer to its end the turn takes
    ``open_turn``, which writes the refresh first, as before."""
    entry = cache.get(session_id)
    if (
        entry is None
        or entry.guard is None
        or entry.client != owner
        or entry.expires_at <= now + timedelta(seconds=max(0.0, budget) + EXPIRY_MARGIN)
        or entry.message_count > gw.context7_max_messages
        or not unchanged(session_id, entry.guard)
    ):
        return None
    recent = list(entry.recent)
    found = "general"
    if content is not None:
        found = classify_topic(content)
        recent.append(["user", snippet(content)])
    topic = entry.topic if found == "general" else found
    opened = Opened(
        entry.pk, session_id, entry.created_at, topic, services.summary_of(recent), False, False
    )
    pending = turns.Pending(
        entry.pk,
        session_id,
        owner,
        entry.created_at,
        content,
        found,
        metadata,
        now,
        tuple(entry.guard),
    )
    return opened, pending


def close() -> None:
    """Forget this thread's connection (it is opened again when next needed)."""
    cached: _Loop | None = getattr(_local, "loop", None)
    _local.loop = None
    if cached is not None:
        cached.raw.close()


@dataclass(slots=True)
class _Job:
    turn: turns.Pending
    reply: Push | None
    now: datetime
    future: asyncio.Future[bool]


class LoopWriter:
    """The turns of one event loop answered during one pass, written at the end of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._jobs: list[_Job] = []

    def record(
        self, turn: turns.Pending, reply: Push | None, now: datetime
    ) -> asyncio.Future[bool]:
        """:func:`~sessions_ctx7.turns.record` for ``turn``, here or in the writer thread."""
        if writer.has_jobs(turn.session_id):  # keep the session's order: behind those
            return writer.submit(
                functools.partial(turns.record, turn, reply, now=now), key=turn.session_id
            )
        future = self.loop.create_future()
        if not self._jobs:
            self.loop.call_soon(self._flush)
        self._jobs.append(_Job(turn, reply, now, future))
        return future

    def _flush(self) -> None:
        jobs, self._jobs = self._jobs, []
        try:
            # While the writer thread has work, it gets the turns (and the write lock) rather
            # than losing the lock, pass after pass, to a loop that never waits for it.
            done, rest = ([], jobs) if writer.busy() else self._write(jobs)
        except Exception:  # nothing of the pass was committed: all of it to the writer thread
            log.debug("context7: a pass of warm turns goes to the writer thread", exc_info=True)
            done, rest = [], jobs
        for job in done:
            if not job.future.done():
                job.future.set_result(True)
        for job in rest:  # in order: jobs of one session keep it in the writer's queue
            try:
                self._hand_over(job)
            except Exception as exc:  # never leave a request waiting for nothing
                if not job.future.done():
                    job.future.set_exception(exc)

    @staticmethod
    def _write(jobs: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """Write what can be written here, in one transaction. Raises only if nothing was
        committed; returns (written, for the writer thread) otherwise."""
        here = _loop()
        done: list[_Job] = []
        rest: list[_Job] = []
        handed: set[str] = set()
        statements.in_batch.fast = True
        statements.in_batch.db = here.db
        cache.begin()
        committed = False
        try:
            here.raw.execute("BEGIN IMMEDIATE")  # busy (someone else writes): raises at once
            # Read under the write lock: nobody else can commit until ours, which leaves our
            # own data_version as it is; so after the commit, this is what we wrote's version.
            version = here.read_version()
            here.note(version)
            for job in jobs:
                key = job.turn.session_id
                if key not in handed and turns.record_warm(job.turn, job.reply, job.now):
                    done.append(job)
                else:  # a miss writes nothing; this and its session's later turns: the writer
                    rest.append(job)
                    handed.add(key)
            here.raw.execute("COMMIT")
            committed = True
        finally:
            statements.in_batch.fast = False
            statements.in_batch.db = None
            cache.end(committed=committed)
            if not committed and here.raw.in_transaction:
                try:
                    here.raw.execute("ROLLBACK")
                except sqlite3.Error:
                    close()  # the transaction ends with the connection
        try:  # committed: from here on nothing may send these turns to the writer again
            checkpointer.committed(here.database)
            for job in done:
                entry = cache.get(job.turn.session_id)
                if entry is not None and entry.guard is not None:
                    here.remember(job.turn.session_id, entry.guard, version)
        except Exception:  # pragma: no cover - bookkeeping only; the next look reads the row
            log.warning("context7: after a commit on the loop", exc_info=True)
        return done, rest

    @staticmethod
    def _hand_over(job: _Job) -> None:
        later = writer.submit(
            functools.partial(turns.record, job.turn, job.reply, now=job.now),
            key=job.turn.session_id,
        )

        def deliver(outcome: asyncio.Future[bool]) -> None:
            if job.future.done():
                return
            if outcome.cancelled():
                job.future.cancel()
            elif outcome.exception() is not None:
                job.future.set_exception(outcome.exception())  # type: ignore[arg-type]
            else:
                job.future.set_result(outcome.result())

        later.add_done_callback(deliver)


def loop_writer() -> LoopWriter:
    """The running loop's :class:`LoopWriter` (one loop per thread)."""
    loop = asyncio.get_running_loop()
    made: LoopWriter | None = getattr(_local, "writer", None)
    if made is None or made.loop is not loop:
        _local.writer = made = LoopWriter(loop)
    return made


__all__ = [
    "Checkpointer",
    "LoopWriter",
    "available",
    "begin_warm",
    "checkpointer",
    "close",
    "loop_writer",
    "unchanged",
]
