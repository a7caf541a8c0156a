"""WAL checkpoints of the event loop's SQLite connections, in a thread of their own
(:mod:`sessions_ctx7.onloop` turns automatic checkpoints off on those connections)."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading

log = logging.getLogger("sessions_ctx7")


class Checkpointer:
    """Copies the WAL back into the database file from a thread of its own.

    A SQLite connection checkpoints when one of its commits takes the WAL past 1 000 pages,
    and a checkpoint fsyncs (``synchronous=NORMAL``): on the event loop that would stall
    every request for the length of two fsyncs. The loop's connection has automatic
    checkpoints off; every :data:`EVERY` commits it asks this thread for a ``PASSIVE`` one,
    which never waits for readers or writers (what it cannot copy yet, a later one does)."""

    EVERY = 64

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._database = ""
        self._thread: threading.Thread | None = None
        self.commits = 0  # commits on loop connections (a test reads it)

    def committed(self, database: str) -> None:
        self.commits += 1
        if self.commits % self.EVERY:
            return
        with self._lock:
            self._database = database
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="context7-checkpoint", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _serve(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                database = self._database
            try:
                with contextlib.closing(sqlite3.connect(database, uri=True, timeout=1)) as conn:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                log.warning("context7: a WAL checkpoint failed", exc_info=True)


checkpointer = Checkpointer()


__all__ = ["Checkpointer", "checkpointer"]
