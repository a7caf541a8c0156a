"""One database writer per process for Context-7 turns, committing many turns at once.

Before, each turn ran its statements in a worker thread of its own (``sync_to_async``):
two thread hops per chat call, a transaction (and a commit) each, and on SQLite every
such thread queueing for the one write lock. Here one thread owns the writes. A request
hands it a job and awaits the job's future; the thread takes every job waiting (up to
:data:`MAX_BATCH`), runs them one after the other inside **one** transaction, commits once,
and only then resolves the futures. Each job brings its own ``transaction.atomic()`` (the
functions of :mod:`sessions_ctx7.services` do), which inside the batch is a savepoint: one
job's refusal (a 403, a race lost) rolls back that job only. So:

- **durable**: a request is answered only after the commit that holds its turn (the
  same promise as before, one commit shared by many requests);
- **ordered**: jobs of one session run in the order they were submitted;
- **no lock waits between unrelated sessions** inside a process: there is one writer,
  so no two of this process's transactions ever wait for each other; across processes
  the batch holds its row locks for one short transaction (PostgreSQL), or the database
  file's write lock (SQLite), as one turn did before;
- **failures stay as they were**: a job's own exception reaches its request unchanged;
  a failed commit (the database went away) reaches every request of the batch as the
  ``DatabaseError`` it is, and the next batch starts on a fresh connection.

This is the "group commit" of database servers (PostgreSQL's ``commit_delay``, InnoDB's
binlog group commit) done one level up, where the gateway can see the requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction

log = logging.getLogger("sessions_ctx7")

#: Jobs committed together at most; a longer queue is taken in several transactions.
MAX_BATCH = 256


@dataclass(slots=True)
class Job:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None


def _deliver(job: Job) -> None:
    """On the request's loop: hand the outcome over (unless the request gave up)."""
    if job.future.done():
        return
    if job.error is not None:
        job.future.set_exception(job.error)
    else:
        job.future.set_result(job.result)


class Writer:
    """The process's Context-7 writer thread (started on first use)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    async def run[T](self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (database work, synchronous) in the next batch; its result once committed."""
        loop = asyncio.get_running_loop()
        job = Job(fn, loop, loop.create_future())
        self._ensure_thread()
        self._jobs.put(job)
        result: T = await job.future
        return result

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="context7-writer", daemon=True
                )
                self._thread.start()

    def _serve(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)
            for job in batch:
                job.loop.call_soon_threadsafe(_deliver, job)

    @staticmethod
    def _commit(batch: list[Job]) -> None:
        if (
            connection.connection is not None
            and connection.errors_occurred
            and not connection.is_usable()
        ):
            connection.close()  # the database restarted: start the batch on a new connection
        try:
            with transaction.atomic():
                for job in batch:
                    try:
                        job.result = job.fn()  # atomic itself: a savepoint of the batch
                    except Exception as exc:
                        job.error = exc
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the batch is stored
            for job in batch:
                if job.error is None:
                    job.error = exc
        except BaseException as exc:  # pragma: no cover - the thread must keep serving
            log.exception("context7 writer: batch aborted")
            for job in batch:
                job.error = job.error or exc


writer = Writer()

__all__ = ["MAX_BATCH", "Writer", "writer"]
