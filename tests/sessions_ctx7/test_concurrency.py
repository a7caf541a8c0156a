"""The message cap under concurrent appends, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connection, connections

OWNER = "client:1"


def hammer(session_id: str, workers: int) -> dict[str, Any]:
    """Open a session, then append from ``workers`` threads at once (user and assistant
    messages alternately), each on its own connection, while a watcher counts rows."""
    from sessions_ctx7 import services
    from sessions_ctx7.models import Message, Session

    opened = services.open_turn(OWNER, session_id, "first")
    barrier = threading.Barrier(workers + 1)
    errors: list[str] = []
    stored: list[bool] = []
    running = threading.Event()
    running.set()
    max_seen = [0]

    def worker(i: int) -> None:
        try:
            barrier.wait()
            if i % 2:
                stored.append(
                    services.append(
                        opened.pk, "assistant", f"reply {i}", generation=opened.generation
                    )
                )
            else:
                services.open_turn(OWNER, session_id, f"message {i}")
                stored.append(True)
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            connections.close_all()

    def watcher() -> None:
        try:
            while running.is_set():
                max_seen[0] = max(max_seen[0], Message.objects.filter(session_id=opened.pk).count())
                time.sleep(0.001)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    watch = threading.Thread(target=watcher)
    watch.start()
    for thread in threads:
        thread.start()
    barrier.wait()
    for thread in threads:
        thread.join(60)
    running.clear()
    watch.join(10)
    session = Session.objects.get(pk=opened.pk)
    return {
        "errors": errors,
        "stored": stored.count(True),
        "seqs": sorted(Message.objects.filter(session=session).values_list("seq", flat=True)),
        "contents": sorted(
            Message.objects.filter(session=session).values_list("content", flat=True)
        ),
        "message_count": session.message_count,
        "seq": session.seq,
        "max_seen": max_seen[0],
    }


def run_hammer(request: Any, gw_env: Any, cap: int, workers: int = 20) -> dict[str, Any]:
    """In this process on PostgreSQL; in a fresh process on a SQLite *file* on SQLite.

    pytest-django's SQLite test database is a shared-cache in-memory database, in which
    concurrent writers fail at once ("database table is locked") instead of waiting:
    the production embedded default (a WAL file with a busy timeout) is what must hold.
    """
    if connection.vendor == "sqlite":
        result: dict[str, Any] = request.getfixturevalue("process").run(
            "from tests.sessions_ctx7.test_concurrency import hammer\n"
            f"print(json.dumps(hammer('conc-1', {workers})))",
            VX11_CONTEXT7_MAX_MESSAGES=cap,
        )
        return result
    gw_env.set(VX11_CONTEXT7_MAX_MESSAGES=cap)
    return hammer("conc-1", workers)


@pytest.mark.db_backend
def test_twenty_concurrent_appends_lose_nothing(transactional_db, request, gw_env):
    result = run_hammer(request, gw_env, cap=50)
    assert result["errors"] == []
    assert result["stored"] == 20
    assert result["seqs"] == list(range(1, 22))  # "first" + 20, numbered without gaps
    assert result["message_count"] == 21
    assert sorted(result["contents"]) == sorted(
        ["first"] + [f"reply {i}" if i % 2 else f"message {i}" for i in range(20)]
    )


@pytest.mark.db_backend
def test_twenty_concurrent_appends_never_exceed_the_cap(transactional_db, request, gw_env):
    result = run_hammer(request, gw_env, cap=5)
    assert result["errors"] == []
    assert result["stored"] == 20
    assert result["seq"] == 21
    assert result["seqs"] == [17, 18, 19, 20, 21]  # the newest five
    assert result["message_count"] == 5
    assert 0 < result["max_seen"] <= 5
