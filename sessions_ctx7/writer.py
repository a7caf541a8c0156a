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
- **no lock waits between unrelated sessions**: inside a process there is one writer, so
  no two of its transactions wait for each other; on PostgreSQL a batch reads each
  session row with ``FOR UPDATE NOWAIT``, and a turn whose row another transaction holds
  is taken out of the batch (with any later turn of that session) and run on its own
  afterwards, so the batch's other sessions never wait for it. SQLite has one write lock
  for the whole file: a batch waits for it as one turn did before;
- **failures stay as they were**: a job's own exception reaches its request unchanged;
  a failed commit (the database went away) reaches every request of the batch as the
  ``DatabaseError`` it is, and the next batch starts on a fresh connection.

This is the "group commit" of database servers (PostgreSQL's ``commit_delay``, InnoDB's
binlog group commit) done one level up, where the gateway can see the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction

from sessions_ctx7 import statements
from sessions_ctx7.cache import cache

log = logging.getLogger("sessions_ctx7")

#: Jobs committed together at most; a longer queue is taken in several transactions.
MAX_BATCH = 256


@dataclass(slots=True)
class Job:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    key: str | None  # the session it writes: one session's jobs keep their order
    result: Any = None
    error: BaseException | None = None


def _hand_over(job: Job) -> None:
    """From a writer thread: schedule the delivery on the request's loop (a loop that has
    closed meanwhile — its request is gone — is skipped, not fatal to the thread)."""
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(_deliver, job)


def _deliver(job: Job) -> None:
    """On the request's loop: hand the outcome over (unless the request gave up)."""
    if job.future.done():
        return
    if job.error is not None:
        job.future.set_exception(job.error)
    else:
        job.future.set_result(job.result)


class Writer:
    """The process's Context-7 writer thread (started on first use), and a second thread
    for the turns whose session row another transaction holds ("parked")."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._waiting: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        #: Sessions with parked turns, and how many: their later turns queue behind them.
        self._parked: dict[str, int] = {}
        #: Sessions with jobs submitted and not yet done, and how many (see has_jobs).
        self._queued: dict[str, int] = {}
        self._running = False  # a batch is being written (see busy)

    async def run[T](self, fn: Callable[[], T], key: str | None = None) -> T:
        """Run ``fn`` (database work, synchronous) in the next batch; its result once committed.

        ``key``: the session the job writes (jobs of one key are applied in order even
        when one of them has to wait for a row lock)."""
        result: T = await self.submit(fn, key)
        return result

    def submit[T](self, fn: Callable[[], T], key: str | None = None) -> asyncio.Future[T]:
        """:meth:`run` without waiting: the job runs whether or not its future is awaited."""
        loop = asyncio.get_running_loop()
        job = Job(fn, loop, loop.create_future(), key)
        self._ensure_threads()
        if key is not None:
            with self._lock:
                self._queued[key] = self._queued.get(key, 0) + 1
        self._jobs.put(job)
        return job.future

    def busy(self) -> bool:
        """True while jobs wait here or a batch runs (it holds, or waits for, the write lock)."""
        return self._running or not self._jobs.empty()

    def has_jobs(self, key: str) -> bool:
        """True while a job of session ``key`` is queued or running here: a turn written
        elsewhere (the event loop's writer) must then queue behind it, to keep the order."""
        return key in self._queued

    def _done(self, job: Job) -> None:
        """The job's outcome is decided (committed, or failed): hand it over."""
        if job.key is not None:
            with self._lock:
                left = self._queued.get(job.key, 1) - 1
                if left > 0:
                    self._queued[job.key] = left
                else:
                    self._queued.pop(job.key, None)
        _hand_over(job)

    def _ensure_threads(self) -> None:
        with self._lock:
            for name, target in (("context7-writer", self._serve), ("context7-parked", self._wait)):
                thread = self._threads.get(name)
                if thread is None or not thread.is_alive():
                    thread = threading.Thread(target=target, name=name, daemon=True)
                    self._threads[name] = thread
                    thread.start()

    def _is_parked(self, key: str) -> bool:
        with self._lock:
            return key in self._parked

    def _serve(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._running = True
            try:
                busy = self._run_batch(batch)
            finally:
                self._running = False
            put_off = set(map(id, busy))
            for job in batch:
                if id(job) not in put_off:
                    self._done(job)
            with self._lock:
                for job in busy:
                    assert job.key is not None
                    self._parked[job.key] = self._parked.get(job.key, 0) + 1
            for job in busy:
                self._waiting.put(job)

    def _run_batch(self, batch: list[Job]) -> list[Job]:
        """The batch without savepoints around warm writes; if one of those fails, the batch
        again with a savepoint per turn (:class:`~sessions_ctx7.statements.Unsafe`)."""
        try:
            return self._commit(batch, nowait=True, parked=self._is_parked, fast=True)
        except statements.Unsafe:
            log.warning("context7 writer: a batch runs again turn by turn", exc_info=True)
            for job in batch:
                job.result = job.error = None
            return self._commit(batch, nowait=True, parked=self._is_parked, fast=False)

    def _wait(self) -> None:
        """Parked turns, one transaction each, waiting for their row like any turn did."""
        while True:
            job = self._waiting.get()
            self._commit([job], nowait=False, parked=None, fast=False)
            self._done(job)
            assert job.key is not None
            with self._lock:
                left = self._parked[job.key] - 1
                if left:
                    self._parked[job.key] = left
                else:
                    del self._parked[job.key]

    @staticmethod
    def _run_jobs(jobs: list[Job], parked: Callable[[str], bool] | None, busy: list[Job]) -> None:
        """Each job in its turn, inside the batch's transaction; put off (into ``busy``) the
        jobs of a session whose row is held elsewhere or that has parked turns."""
        busy_keys: set[str] = set()
        for job in jobs:
            key = job.key
            if key is not None and (key in busy_keys or (parked is not None and parked(key))):
                busy.append(job)
                busy_keys.add(key)
                continue
            mark = cache.mark()
            try:
                job.result = job.fn()  # atomic itself: a savepoint of the batch
            except statements.Unsafe:
                raise  # out of the transaction: the batch is rolled back
            except statements.RowBusy:
                cache.rollback_to(mark)
                if key is None:
                    raise
                busy.append(job)
                busy_keys.add(key)
            except Exception as exc:
                cache.rollback_to(mark)
                job.error = exc

    @staticmethod
    def _commit(
        jobs: list[Job], *, nowait: bool, parked: Callable[[str], bool] | None, fast: bool
    ) -> list[Job]:
        """Run ``jobs`` in one transaction; return those put off because their session's
        row was locked by another transaction (``nowait``: PostgreSQL's ``NOWAIT``) or
        because the session already has parked turns — in order, with every later job of
        such a session, so the turns of one session keep their order.

        ``fast``: warm writes run without savepoints; if one fails, Unsafe is raised after
        the whole transaction was rolled back (nothing of the batch is stored)."""
        if (
            connection.connection is not None
            and connection.errors_occurred
            and not connection.is_usable()
        ):
            connection.close()  # the database restarted: start the batch on a new connection
        busy: list[Job] = []
        statements.in_batch.active = nowait
        statements.in_batch.fast = fast
        statements.in_batch.wrapper = connections[DEFAULT_DB_ALIAS]
        cache.begin()
        committed = False
        try:
            with transaction.atomic():
                Writer._run_jobs(jobs, parked, busy)
            committed = True
        except statements.Unsafe:
            raise
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the batch is stored
            put_off = set(map(id, busy))
            for job in jobs:
                if job.error is None and id(job) not in put_off:
                    job.error = exc
        except BaseException as exc:  # pragma: no cover - the thread must keep serving
            log.exception("context7 writer: batch aborted")
            for job in jobs:
                job.error = job.error or exc
        finally:
            statements.in_batch.active = statements.in_batch.fast = False
            statements.in_batch.wrapper = None
            cache.end(committed=committed)
        return busy


writer = Writer()

__all__ = ["MAX_BATCH", "Writer", "writer"]
