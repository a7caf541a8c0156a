"""A bounded in-process cache of Context-7 session rows, validated by the database.

The writer thread (:mod:`sessions_ctx7.writer`) keeps, for each session it wrote
recently, the row as it committed it: owner, counters, the last snippets, the expiry.
A turn on a warm session then needs no read: it writes the row back with an
``UPDATE … WHERE id = ? AND seq = ? AND expires_at = ? AND …`` carrying the
values it was computed from. Any write by anyone else (another gateway process, the
admin's expire action, the purge worker, a restart) changes one of those columns (every
column the turn writes is compared) or deletes the row, the ``UPDATE`` matches nothing, the entry is dropped and the turn is
run again on a fresh read. So the cache can be stale, never wrong: the database decides.

Entries are only recorded once the batch that wrote them has committed (a job rolled
back to its savepoint, or a failed commit, leaves the previous entry, which still
matches the database). Dropping an entry is always safe and happens at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: Sessions remembered at most per process (least recently used dropped first).
MAX_ENTRIES = 10_000


@dataclass(slots=True)
class Entry:
    """A session row as last committed by this process (attribute names as the model's)."""

    pk: int
    session_id: str
    client: str
    created_at: datetime
    last_activity: datetime
    expires_at: datetime
    topic: str
    message_count: int
    seq: int
    recent: list[Any]
    #: The row's columns as prepared for the database (``statements.GUARD_FIELDS``), once
    #: known: the next guarded write compares with them without preparing them again.
    guard: list[Any] | None = None

    def copy(self) -> Entry:
        return Entry(
            self.pk,
            self.session_id,
            self.client,
            self.created_at,
            self.last_activity,
            self.expires_at,
            self.topic,
            self.message_count,
            self.seq,
            list(self.recent),
            self.guard,
        )


class Cache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._by_pk: dict[int, str] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    # ------------------------------------------------------------------ reading

    @property
    def active(self) -> bool:
        """True in a thread that is running a writer batch (elsewhere: no caching)."""
        return getattr(self._local, "pending", None) is not None

    def get(self, session_id: str) -> Entry | None:
        """The row as this thread's batch left it so far, else as last committed."""
        staged: dict[str, Entry] | None = getattr(self._local, "staged", None)
        if staged:
            entry = staged.get(session_id)
            if entry is not None:
                return entry.copy()
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is not None:
                self._entries.move_to_end(session_id)
                return entry.copy()
        return None

    def get_pk(self, pk: int) -> Entry | None:
        staged: dict[str, Entry] | None = getattr(self._local, "staged", None)
        if staged:
            for entry in staged.values():
                if entry.pk == pk:
                    return entry.copy()
        with self._lock:
            session_id = self._by_pk.get(pk)
        return None if session_id is None else self.get(session_id)

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ writing

    def drop(self, session_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(session_id, None)
            if entry is not None:
                self._by_pk.pop(entry.pk, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_pk.clear()

    def stage(self, entry: Entry) -> None:
        """Remember ``entry`` once the running batch commits (only inside a batch)."""
        pending: list[Entry] | None = getattr(self._local, "pending", None)
        if pending is not None:
            pending.append(entry.copy())
            self._local.staged[entry.session_id] = pending[-1]

    def begin(self) -> None:
        self._local.pending = []
        self._local.staged = {}

    def mark(self) -> int:
        pending: list[Entry] = self._local.pending
        return len(pending)

    def rollback_to(self, mark: int) -> None:
        """A job rolled back to its savepoint: forget what it staged (and drop those ids,
        an earlier job of the batch may have staged them from the same stale state)."""
        pending: list[Entry] = self._local.pending
        for entry in pending[mark:]:
            self.drop(entry.session_id)
            self._local.staged.pop(entry.session_id, None)
        del pending[mark:]

    def end(self, *, committed: bool) -> None:
        pending: list[Entry] = self._local.pending
        self._local.pending = self._local.staged = None
        if not committed:
            for entry in pending:
                self.drop(entry.session_id)
            return
        with self._lock:
            for entry in pending:
                old = self._entries.pop(entry.session_id, None)
                if old is not None and old.pk != entry.pk:
                    self._by_pk.pop(old.pk, None)
                self._entries[entry.session_id] = entry
                self._by_pk[entry.pk] = entry.session_id
            while len(self._entries) > self.max_entries:
                _, evicted = self._entries.popitem(last=False)
                self._by_pk.pop(evicted.pk, None)


cache = Cache()

__all__ = ["MAX_ENTRIES", "Cache", "Entry", "cache"]
