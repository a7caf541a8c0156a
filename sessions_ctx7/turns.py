"""A chat turn begun without the writer: its user message and reply written in one go.

A turn whose session this process wrote last (:mod:`sessions_ctx7.cache`), and whose row the
database still holds unchanged, starts without any database work
(:func:`sessions_ctx7.onloop.begin_warm` builds what :func:`~sessions_ctx7.services.open_turn`
would return — owner checked, topic, summary with the user's message — from the cached row).
Its user message and reply are then written together after the answer and before it goes to
the client: :func:`record_warm` on the event loop's own connection
(:class:`sessions_ctx7.onloop.LoopWriter`), else :func:`record` in the writer thread. One
guarded ``UPDATE`` and two ``INSERT`` s, instead of two jobs of two statements each. A turn
the module did not answer records the user's message alone (no reply), as the first job of
a turn would have.

What the turn was computed from is checked again when it is written: the row as the cache
holds it (the guard), else the row itself, locked. A session ended, restarted or taken
over meanwhile gets nothing of this turn (as a reply to it would have been refused); a
session that other turns wrote meanwhile gets the turn on top of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction

from gateway.core.conf import gw
from sessions_ctx7 import services, statements
from sessions_ctx7.cache import cache
from sessions_ctx7.warm import Push, entry_of, expires_at_for, unprotected, write_warm


# Not frozen (made per request; docs/PERFORMANCE.md "fourth pass"), never changed.
@dataclass(slots=True)
class Pending:
    """A turn begun without the writer: what :func:`record` writes once it is answered."""

    pk: int
    session_id: str
    owner: str
    generation: datetime  # the row's created_at when the turn began
    content: str | None  # the user's message (None: the body had none)
    found: str  # the message's topic ("general": none of its own, the session's stays)
    metadata: dict[str, Any]
    began: datetime
    guard: tuple[Any, ...]  # the row's columns as the turn saw them


def record(turn: Pending, reply: Push | None, *, now: datetime | None = None) -> bool:
    """Write a turn begun by :func:`~sessions_ctx7.onloop.begin_warm`: the user's message, then ``reply`` if the
    session is still alive for it. False: the session ended or changed hands meanwhile,
    nothing was written. Runs in the writer (``writer.run(…, key=session_id)``)."""
    now = services.resolve_now(now)
    # In a fast batch a warm write needs no savepoint (see warm.unprotected).
    if statements.fast_batch() and unprotected(record_warm, turn, reply, now):
        return True
    with transaction.atomic():
        if record_warm(turn, reply, now):
            return True
        return _record_read(turn, reply, now)


def _pushes(
    turn: Pending, reply: Push | None, expires_at: datetime, now: datetime
) -> tuple[list[Push], datetime | None]:
    """The turn's messages, and the expiry after them if the reply is among them."""
    pushes = []
    if turn.content is not None:
        pushes.append(Push("user", turn.content, turn.metadata, turn.began))
    if reply is not None and expires_at > now:  # alive for the reply, as an append checks
        pushes.append(reply)
        return pushes, expires_at_for(turn.generation, now)
    return pushes, None


def record_warm(turn: Pending, reply: Push | None, now: datetime) -> bool:
    """:func:`record` on the cached row, without reading it; False (nothing written) when
    the row is not the cached one. Raises on a database error, with the turn half written:
    the caller's transaction must then be rolled back (``warm.unprotected``)."""
    entry = cache.get(turn.session_id) if cache.active else None
    if (
        entry is None
        or entry.pk != turn.pk
        or entry.created_at != turn.generation
        or entry.client != turn.owner
        or entry.expires_at <= turn.began
    ):
        return False
    # The turn began on a live session: as open_turn would have, it refreshed the expiry then.
    alive_until = max(entry.expires_at, expires_at_for(entry.created_at, turn.began))
    pushes, replied_until = _pushes(turn, reply, alive_until, now)
    if turn.found != "general":
        entry.topic = turn.found
    if replied_until is not None:
        return write_warm(entry, pushes, now, replied_until)
    return write_warm(entry, pushes, max(entry.last_activity, turn.began), alive_until)


def _record_read(turn: Pending, reply: Push | None, now: datetime) -> bool:
    session = statements.lock_session("pk", turn.pk)
    if session is None or session.created_at != turn.generation or session.client != turn.owner:
        return False  # deleted, restarted or taken over since the turn began
    untouched = tuple(statements.prep_guard(session)) == turn.guard
    if not untouched and session.is_expired(now):
        return False  # ended meanwhile (the admin's expire, or its time ran out after others)
    if session.expires_at <= turn.began:
        return False
    alive_until = max(session.expires_at, expires_at_for(session.created_at, turn.began))
    pushes, replied_until = _pushes(turn, reply, alive_until, now)
    cap = gw.context7_max_messages
    if turn.found != "general":
        session.topic = turn.found
    for message in pushes:
        services.push_message(session, message, cap)
    if replied_until is not None:
        session.last_activity, session.expires_at = now, replied_until
    else:
        session.last_activity = max(session.last_activity, turn.began)
        session.expires_at = alive_until
    statements.save_session(session, services.SAVED_FIELDS)
    cache.stage(entry_of(session))
    return True


__all__ = ["Pending", "record", "record_warm"]
