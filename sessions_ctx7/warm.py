"""A Context-7 turn on a cached session row: no read, one guarded write, then the messages.

The writer thread (:mod:`sessions_ctx7.writer`) remembers the rows it committed
(:mod:`sessions_ctx7.cache`); :func:`write_warm` writes a turn onto such a row with an
``UPDATE`` guarded by every column the turn was computed from, so a row changed by anyone
else is never overwritten: the guard misses, nothing is written, and the caller takes the
path that reads the row (:mod:`sessions_ctx7.services`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.core.conf import gw
from sessions_ctx7 import statements
from sessions_ctx7.cache import Entry, cache
from sessions_ctx7.models import Message, Session

SNIPPET_CHARS = 100
SUMMARY_MESSAGES = 3


def expires_at_for(created_at: datetime, last_activity: datetime) -> datetime:
    """Sliding TTL from the last activity, never past the absolute cap from creation."""
    sliding = last_activity + _seconds(gw.context7_ttl_seconds)
    absolute = created_at + _seconds(gw.context7_max_age_seconds)
    return min(sliding, absolute)


@functools.lru_cache(maxsize=16)
def _seconds(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def snippet(content: str) -> str:
    return " ".join(content[: SNIPPET_CHARS * 4].split())[:SNIPPET_CHARS]


def entry_of(session: Session) -> Entry:
    """The cache's copy of a row this batch wrote (with its guard, prepared once here)."""
    entry = Entry(
        session.pk,
        session.session_id,
        session.client,
        session.created_at,
        session.last_activity,
        session.expires_at,
        session.topic,
        session.message_count,
        session.seq,
        list(session.recent),
    )
    entry.guard = statements.prep_guard(entry)
    return entry


# Not frozen (made per request; docs/PERFORMANCE.md "fourth pass"), never changed.
@dataclass(slots=True)
class Push:
    """A message to add to a session: who, what, with which metadata, when."""

    role: str
    content: str
    metadata: dict[str, Any]
    at: datetime


def write_warm(entry: Entry, pushes: Sequence[Push], touch: datetime, expires_at: datetime) -> bool:
    """Add ``pushes`` to a cached row without reading it, setting ``last_activity`` to
    ``touch`` and the expiry to ``expires_at``; False (nothing written) when the row is no
    longer what the cache holds, or the turn needs a rare path (the cap was lowered).

    One guarded ``UPDATE`` of the session row first (a miss writes nothing), then one
    ``INSERT`` (or, at the cap, a rewrite of the oldest row) per message."""
    cap = gw.context7_max_messages
    if entry.message_count > cap:
        return False
    guard = entry.guard if entry.guard is not None else statements.prep_guard(entry)
    count = entry.message_count
    entry.last_activity, entry.expires_at = touch, expires_at
    for message in pushes:
        entry.recent = [*entry.recent, [message.role, snippet(message.content)]]
    entry.recent = entry.recent[-SUMMARY_MESSAGES:]
    entry.seq += len(pushes)
    entry.message_count = min(count + len(pushes), cap)
    entry.guard = statements.save_session_if(entry, entry.pk, guard)
    if entry.guard is None:
        cache.drop(entry.session_id)
        return False
    seq = entry.seq - len(pushes)
    for message in pushes:
        seq += 1
        if count < cap:
            statements.insert_message(
                entry.pk, seq, message.role, message.content, message.metadata, message.at
            )
            count += 1
        elif not statements.recycle_message(
            entry.pk, seq - cap, seq, message.role, message.content, message.metadata, message.at
        ):  # numbers not contiguous (never expected): the general way, as _push
            statements.insert_message(
                entry.pk, seq, message.role, message.content, message.metadata, message.at
            )
            Message.objects.filter(session_id=entry.pk, seq__lte=seq - cap).delete()
            entry.message_count = Message.objects.filter(session_id=entry.pk).count()
            statements.save_session(entry, ["message_count"])
            entry.guard = None
    cache.stage(entry)
    return True


def unprotected[T](fn: Callable[..., T], *args: Any) -> T:
    """Run a warm write without a savepoint (inside a fast writer batch).

    Safe because a warm write starts with its guarded ``UPDATE``: a miss writes nothing and
    the turn goes on to the savepoint path. Any failure after that may leave half a turn in
    the batch's transaction, so it becomes :class:`~sessions_ctx7.statements.Unsafe` and
    the writer rolls the batch back and runs it again with a savepoint per turn."""
    try:
        return fn(*args)
    except Exception as exc:
        raise statements.Unsafe(f"{type(exc).__name__}: {exc}") from exc
