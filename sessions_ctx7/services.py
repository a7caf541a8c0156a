"""Context-7 rules: expiry, appends under the message cap, summary, topic, cleanup.

Synchronous and database-bound: the proxy hook (:mod:`sessions_ctx7.enrich`)
runs these in a worker thread; the API, the admin and ``purge_context7`` call
them directly. Every function that depends on the time takes ``now=`` so tests
pin the clock.

The statements of a turn on an existing session go through
:mod:`sessions_ctx7.statements` (SQL rendered once, values prepared by the fields); the
rare paths use the ORM.

Inside the process's writer a warm session is not read at all: the turn is computed from
the row this process last committed (:mod:`sessions_ctx7.cache`) and written back with an
``UPDATE`` guarded by the columns it was computed from; a row changed by anyone else fails
the guard and the turn runs on a fresh read, as below.

Concurrency: a turn locks its session row (``SELECT … FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers) before it reads
the message counter, so concurrent appends on one session queue up instead of
racing, none is lost and the cap is never exceeded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from gateway.core.conf import gw
from gateway.core.problems import Forbidden
from sessions_ctx7 import statements
from sessions_ctx7.cache import Entry, cache
from sessions_ctx7.models import Message, Session
from sessions_ctx7.topics import classify_topic as classify_topic  # re-exported
from sessions_ctx7.warm import (
    SUMMARY_MESSAGES,
    Push,
    entry_of,
    snippet,
    unprotected,
    write_warm,
)
from sessions_ctx7.warm import expires_at_for as expires_at_for  # re-exported

# ``\Z``, not ``$``: ``$`` also matches before a trailing newline, and "abc\n" would then
# be stored and sent back in the ``X-VX11-Session`` header (an illegal header value).
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
SUMMARY_CHARS = 256
PURGE_BATCH = 500
SAVED_FIELDS = [
    "client",
    "created_at",
    "last_activity",
    "expires_at",
    "topic",
    "message_count",
    "seq",
    "recent",
]


# Not frozen (made per request; docs/PERFORMANCE.md "fourth pass"), never changed.
@dataclass(slots=True)
class Opened:
    """What a turn needs after the user's message was recorded."""

    pk: int
    session_id: str
    generation: datetime  # created_at: changes when an expired session starts over
    topic: str
    summary: str
    created: bool
    restarted: bool


# --------------------------------------------------------------------------- expiry


def resolve_now(now: datetime | None) -> datetime:
    return timezone.now() if now is None else now


def is_expired(session: Session, *, now: datetime | None = None) -> bool:
    return session.is_expired(resolve_now(now))


def ttl_left(session: Session, *, now: datetime | None = None) -> timedelta:
    return max(session.expires_at - resolve_now(now), timedelta(0))


def clear_expired(*, now: datetime | None = None, owner: str | None = None) -> int:
    """Delete expired sessions (of ``owner`` only, when given); return how many.

    Batches of rows locked then deleted: a request reviving one of them at the same
    moment either wins the lock (the row no longer matches) or finds it gone.
    """
    now = resolve_now(now)
    total = 0
    while True:
        with transaction.atomic():
            expired = Session.objects.filter(expires_at__lte=now)
            if owner is not None:
                expired = expired.filter(client=owner)
            pks = list(
                expired.select_for_update()
                .order_by("pk")
                .values_list("pk", flat=True)[:PURGE_BATCH]
            )
            if not pks:
                return total
            _, per_model = Session.objects.filter(pk__in=pks).delete()
            total += per_model.get(Session._meta.label, 0)
        if len(pks) < PURGE_BATCH:
            return total


def expire_now(pks: list[int], *, now: datetime | None = None) -> int:
    """End sessions at once (admin action); they are purged by the next cleanup."""
    now = resolve_now(now)
    return Session.objects.filter(pk__in=pks, expires_at__gt=now).update(expires_at=now)


# --------------------------------------------------------------------------- content


def summary_of(recent: list[Any]) -> str:
    """``role: first 100 chars`` of the last 3 messages, one per line, ≤ 256 chars."""
    lines = [f"{role}: {text}" for role, text in recent[-SUMMARY_MESSAGES:]]
    return "\n".join(lines)[:SUMMARY_CHARS]


# --------------------------------------------------------------------------- turns


def _push(
    session: Session, role: str, content: str, metadata: dict[str, Any], now: datetime, cap: int
) -> None:
    """Add a message to a locked session; the caller saves the session row.

    Below the cap: one INSERT. At the cap: the oldest row (number ``seq - cap``,
    numbers are contiguous) is rewritten as the newest — one UPDATE, and the row
    count never goes past the cap. Anything else (the cap was lowered): insert,
    then delete all but the newest ``cap``.
    """
    session.seq += 1
    seq = session.seq
    if session.message_count < cap:
        statements.insert_message(session.pk, seq, role, content, metadata, now)
        session.message_count += 1
    elif not (
        session.message_count == cap
        and statements.recycle_message(session.pk, seq - cap, seq, role, content, metadata, now)
    ):
        statements.insert_message(session.pk, seq, role, content, metadata, now)
        Message.objects.filter(session_id=session.pk, seq__lte=seq - cap).delete()
        session.message_count = Message.objects.filter(session_id=session.pk).count()
    session.recent = [*session.recent, [role, snippet(content)]][-SUMMARY_MESSAGES:]


def push_message(session: Session, message: Push, cap: int) -> None:
    """:func:`_push` of one :class:`~sessions_ctx7.warm.Push` (a locked row; caller saves it)."""
    _push(session, message.role, message.content, message.metadata, message.at, cap)


def _write_warm(
    entry: Entry, role: str | None, content: str | None, metadata: dict[str, Any], now: datetime
) -> bool:
    """One message (or none: a touch) at ``now`` on a live cached row."""
    if entry.expires_at <= now:
        return False
    pushes = (
        [Push(role, content, metadata, now)] if role is not None and content is not None else []
    )
    return write_warm(entry, pushes, now, expires_at_for(entry.created_at, now))


def _append_warm(
    pk: int, role: str, content: str, generation: datetime, now: datetime, meta: dict[str, Any]
) -> bool:
    entry = cache.get_pk(pk) if cache.active else None
    return (
        entry is not None
        and entry.created_at == generation
        and _write_warm(entry, role, content, meta, now)
    )


def _open_warm(
    owner: str, session_id: str, content: str | None, now: datetime, metadata: dict[str, Any]
) -> Opened | None:
    entry = cache.get(session_id) if cache.active else None
    if entry is None or entry.client != owner:  # unknown here, or the database decides (403)
        return None
    if content is not None:
        topic = classify_topic(content)
        if topic != "general":
            entry.topic = topic
    if not _write_warm(entry, "user" if content is not None else None, content, metadata, now):
        return None
    return Opened(
        entry.pk,
        session_id,
        entry.created_at,
        entry.topic,
        summary_of(entry.recent),
        False,
        False,
    )


def open_turn(
    owner: str,
    session_id: str,
    content: str | None,
    *,
    now: datetime | None = None,
    metadata: dict[str, Any] | None = None,
) -> Opened:
    """Find or start ``session_id`` for ``owner`` and record the user's message.

    Unknown id: created for the caller. Expired (sliding or absolute): started
    over under the same id with an empty history, for the caller. Alive and
    owned by someone else: :class:`Forbidden`. Three statements on the usual
    path: lock/read the row, write the message, write the row.
    """
    now = resolve_now(now)
    if statements.fast_batch():  # a warm write needs no savepoint (see _unprotected)
        warm = unprotected(_open_warm, owner, session_id, content, now, metadata or {})
        if warm is not None:
            return warm
    for attempt in range(2):
        try:
            with transaction.atomic():
                warm = _open_warm(owner, session_id, content, now, metadata or {})
                if warm is not None:
                    return warm
                return _open_turn(owner, session_id, content, now, metadata or {})
        except IntegrityError:
            # Two first requests raced to create the same id (PostgreSQL); the
            # loser retries and finds the winner's row.
            if attempt:
                raise
    raise AssertionError("unreachable")


def _open_turn(
    owner: str, session_id: str, content: str | None, now: datetime, metadata: dict[str, Any]
) -> Opened:
    cap = gw.context7_max_messages
    session = statements.lock_session("session_id", session_id)
    created = restarted = False
    if session is None:
        created = True
        session = Session(session_id=session_id, client=owner, created_at=now)
    elif session.is_expired(now):
        restarted = True
        if session.seq:
            Message.objects.filter(session_id=session.pk).delete()
        session.client, session.created_at = owner, now
        session.message_count, session.recent, session.topic = 0, [], "general"
    elif session.client != owner:
        raise Forbidden(f"Session {session_id!r} belongs to another client.")
    session.last_activity = now
    session.expires_at = expires_at_for(session.created_at, now)
    if content is not None:
        topic = classify_topic(content)
        if topic != "general":  # a bare "thanks" keeps a code conversation's topic
            session.topic = topic
    if created:
        if content is not None:
            session.seq = session.message_count = 1
            session.recent = [["user", snippet(content)]]
        session.save(force_insert=True)
        if content is not None:
            Message.objects.create(
                session=session,
                seq=1,
                role="user",
                content=content,
                metadata=metadata,
                created_at=now,
            )
    else:
        if content is not None:
            _push(session, "user", content, metadata, now, cap)
        statements.save_session(session, SAVED_FIELDS)
    cache.stage(entry_of(session))
    return Opened(
        session.pk,
        session.session_id,
        session.created_at,
        session.topic,
        summary_of(session.recent),
        created,
        restarted,
    )


def append(
    pk: int,
    role: str,
    content: str,
    *,
    generation: datetime,
    now: datetime | None = None,
    metadata: dict[str, Any] | None = None,
) -> bool:
    """Record a message in the session a turn opened; False if it is gone.

    Gone means deleted, expired, or started over since (its ``created_at`` is no
    longer ``generation``): a late answer never revives or pollutes a conversation.
    """
    now = resolve_now(now)
    if statements.fast_batch() and unprotected(
        _append_warm, pk, role, content, generation, now, metadata or {}
    ):
        return True
    with transaction.atomic():
        if _append_warm(pk, role, content, generation, now, metadata or {}):
            return True
        session = statements.lock_session("pk", pk)
        if session is None or session.created_at != generation or session.is_expired(now):
            return False
        _push(session, role, content, metadata or {}, now, gw.context7_max_messages)
        session.last_activity = now
        session.expires_at = expires_at_for(session.created_at, now)
        statements.save_session(session, SAVED_FIELDS)
        cache.stage(entry_of(session))
    return True
