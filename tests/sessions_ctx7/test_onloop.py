"""Warm turns on the event loop (sessions_ctx7/onloop.py): no writer job, one commit per pass
of the loop, and every case where the loop must let the writer thread decide.

Each scenario runs in a fresh interpreter on the production embedded default — a SQLite file in
WAL mode (``process`` fixture) — because pytest-django's in-memory shared-cache database does
not lock like a file does.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import threading
import time
from typing import Any

import pytest

OWNER = "client:1"
JSON = "application/json"


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


class Counted:
    """Counts the jobs handed to the process's writer thread (the real one, unchanged)."""

    def __init__(self) -> None:
        from sessions_ctx7.writer import writer

        self.jobs = 0
        original = writer.submit

        def submit(fn: Any, key: str | None = None) -> Any:
            self.jobs += 1
            return original(fn, key)

        writer.submit = submit  # type: ignore[method-assign]


def rows(session_id: str) -> list[list[Any]]:
    from sessions_ctx7.models import Message

    return [
        list(row)
        for row in Message.objects.filter(session__session_id=session_id)
        .order_by("seq")
        .values_list("seq", "role", "content")
    ]


def exchanges(*texts: str, first: int = 1) -> list[list[Any]]:
    """The rows of turns answered by ``_turn``: each text, then "re: " it, numbered on."""
    rows: list[list[Any]] = []
    for text in texts:
        rows += [
            [first + len(rows), "user", text],
            [first + len(rows) + 1, "assistant", f"re: {text}"],
        ]
    return rows


async def _turn(session_id: str, text: str, *, owner: str = OWNER) -> Any:
    from sessions_ctx7 import enrich

    turn = await enrich.begin(owner, _body(message=text), session_id)
    await enrich.finish(turn, 200, JSON, _body(response=f"re: {text}"))
    return turn


def _summary(turn: Any) -> str:
    return str(json.loads(turn.body)["metadata"]["context_summary"])


async def _stored(session_id: str) -> list[list[Any]]:
    from asgiref.sync import sync_to_async

    return await sync_to_async(rows, thread_sensitive=False)(session_id)


def scenario_warm_turns() -> dict[str, Any]:
    from sessions_ctx7 import onloop

    async def main() -> dict[str, Any]:
        counted = Counted()
        first = await _turn("w", "one")
        cold_jobs = counted.jobs
        second = await _turn("w", "two")
        third = await _turn("w", "three")
        warm_jobs = counted.jobs - cold_jobs
        commits = onloop.checkpointer.commits
        await asyncio.gather(*(_turn(f"g{i}", "hello") for i in range(10)))  # cold: writer
        await asyncio.gather(*(_turn(f"g{i}", "again") for i in range(10)))  # warm: one pass
        return {
            "pending": [
                first.pending is not None,
                second.pending is not None,
                third.pending is not None,
            ],
            "warm_jobs": warm_jobs,
            "cold_jobs": cold_jobs,
            "summary": _summary(third),
            "rows": await _stored("w"),
            "commits_for_ten": onloop.checkpointer.commits - commits,
            "g3": await _stored("g3"),
        }

    return asyncio.run(main())


def test_warm_turns_need_no_writer_job_and_share_one_commit(process: Any) -> None:
    result = process.run(
        "from tests.sessions_ctx7.test_onloop import scenario_warm_turns\n"
        "print(json.dumps(scenario_warm_turns()))"
    )
    assert result["pending"] == [False, True, True]
    assert result["cold_jobs"] == 2 and result["warm_jobs"] == 0
    assert result["summary"] == "user: two\nassistant: re: two\nuser: three"
    assert result["rows"] == exchanges("one", "two", "three")
    assert result["commits_for_ten"] == 1  # ten sessions' turns, answered in one pass
    assert result["g3"] == exchanges("hello", "again")


def scenario_writes_from_elsewhere() -> dict[str, Any]:
    from asgiref.sync import sync_to_async

    from sessions_ctx7 import enrich, services
    from sessions_ctx7.models import Session

    def elsewhere(fn: Any) -> Any:  # another thread, its own connection: another process
        return sync_to_async(fn, thread_sensitive=False)()

    async def main() -> dict[str, Any]:
        first = await _turn("e", "one")
        await _turn("e", "two")
        await elsewhere(
            functools.partial(
                services.append,
                first.session_pk,
                "assistant",
                "from elsewhere",
                generation=first.generation,
            )
        )
        seen = await enrich.begin(OWNER, _body(message="three"), "e")
        await enrich.finish(seen, 200, JSON, _body(response="re: three"))
        pk = first.session_pk
        await elsewhere(lambda: services.expire_now([pk]))
        restarted = await enrich.begin(OWNER, _body(message="four"), "e")
        await enrich.finish(restarted, 200, JSON, _body(response="re: four"))
        await elsewhere(lambda: Session.objects.filter(pk=pk).update(client="client:2"))
        refused = None
        try:
            await enrich.begin(OWNER, _body(message="five"), "e")
        except Exception as exc:
            refused = type(exc).__name__
        return {
            "seen_pending": seen.pending is not None,
            "seen_summary": _summary(seen),
            "restarted": [restarted.restarted, _summary(restarted)],
            "refused": refused,
            "rows": await _stored("e"),
        }

    return asyncio.run(main())


def test_a_row_changed_elsewhere_is_seen_before_the_module_is_called(process: Any) -> None:
    """Another process appends, the admin expires, an owner changes: each is seen by the very
    next turn although the session was cached (the look at the row on the loop)."""
    result = process.run(
        "from tests.sessions_ctx7.test_onloop import scenario_writes_from_elsewhere\n"
        "print(json.dumps(scenario_writes_from_elsewhere()))"
    )
    assert result["seen_pending"] is False  # decided by the writer, on a fresh read
    assert "assistant: from elsewhere" in result["seen_summary"]
    assert result["restarted"] == [True, "user: four"]
    assert result["refused"] == "Forbidden"
    assert result["rows"][-2:] == exchanges("four", first=8)


def scenario_data_version_per_pass(database: str) -> dict[str, Any]:
    from sessions_ctx7 import onloop
    from sessions_ctx7.cache import cache

    async def main() -> dict[str, Any]:
        await _turn("v", "one")
        await _turn("v", "two")  # warm from here on
        await asyncio.sleep(0)
        entry = cache.get("v")
        assert entry is not None and entry.guard is not None
        guard = entry.guard
        looks: list[str] = []
        onloop._loop().raw.set_trace_callback(looks.append)
        same_pass = [onloop.unchanged("v", guard), onloop.unchanged("v", guard)]
        versions_read = sum("data_version" in sql for sql in looks)
        other = sqlite3.connect(database, isolation_level=None)  # another process's commit
        other.execute("UPDATE sessions_ctx7_session SET topic = 'elsewhere' WHERE session_id = 'v'")
        other.close()
        in_that_pass = onloop.unchanged("v", guard)
        await asyncio.sleep(0)  # the loop's next pass
        next_pass = onloop.unchanged("v", guard)
        turn = await _turn("v", "three")
        return {
            "same_pass": same_pass,
            "versions_read": versions_read,
            "in_that_pass": in_that_pass,
            "next_pass": next_pass,
            "pending": turn.pending is not None,
        }

    return asyncio.run(main())


def test_data_version_is_read_once_per_pass_and_a_commit_is_seen_in_the_next(
    process: Any,
) -> None:
    """``PRAGMA data_version`` once per pass of the loop, not per look; another connection's
    commit is seen from the next pass on (every request read after it is)."""
    database = str(process.env["VX11_VAR_DIR"]) + "/vx11.sqlite3"
    result = process.run(
        "from tests.sessions_ctx7.test_onloop import scenario_data_version_per_pass\n"
        f"print(json.dumps(scenario_data_version_per_pass({database!r})))"
    )
    assert result["same_pass"] == [True, True] and result["versions_read"] == 1
    assert result["in_that_pass"] is True  # the pass's look stands for its first moment
    assert result["next_pass"] is False
    assert result["pending"] is False  # the changed row: decided by the writer


def scenario_busy_database(database: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        await _turn("b", "one")
        await _turn("b", "two")  # warm from here on
        locked, release = threading.Event(), threading.Event()

        def hold() -> None:  # another process's long write transaction
            conn = sqlite3.connect(database, timeout=5, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(10)
            conn.execute("COMMIT")
            conn.close()

        holder = threading.Thread(target=hold)
        holder.start()
        assert locked.wait(10)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        started = time.monotonic()
        turn = asyncio.ensure_future(_turn("b", "three"))
        await asyncio.sleep(0.3)
        waited = not turn.done()
        release.set()
        await asyncio.wait_for(turn, 10)
        ticker.cancel()
        holder.join(10)
        return {
            "waited": waited,
            "ticks": ticks,
            "seconds": time.monotonic() - started,
            "pending": turn.result().pending is not None,
            "rows": await _stored("b"),
        }

    return asyncio.run(main())


def test_a_busy_database_never_blocks_the_loop_and_loses_nothing(process: Any) -> None:
    """Another connection holds the write lock: the answered turn waits in the writer thread
    (the loop keeps serving: it ticked meanwhile), then lands."""
    database = str(process.env["VX11_VAR_DIR"]) + "/vx11.sqlite3"
    result = process.run(
        "from tests.sessions_ctx7.test_onloop import scenario_busy_database\n"
        f"print(json.dumps(scenario_busy_database({database!r})))"
    )
    assert result["pending"] is True and result["waited"] is True
    assert result["ticks"] >= 10  # ~30 expected in 0.3 s; a blocked loop gives 0
    assert result["rows"][-2:] == exchanges("three", first=5)


def scenario_no_answer() -> dict[str, Any]:
    from sessions_ctx7 import enrich

    async def main() -> dict[str, Any]:
        await _turn("n", "one")
        turn = await enrich.begin(OWNER, _body(message="lost module"), "n")
        await enrich.settle(turn)  # the module failed: no answer at all
        error = await enrich.begin(OWNER, _body(message="error answer"), "n")
        await enrich.finish(error, 503, JSON, _body(error="busy"))
        return {
            "pending": [turn.pending is not None, error.pending is not None],
            "rows": await _stored("n"),
        }

    return asyncio.run(main())


def test_a_turn_without_an_answer_still_stores_the_users_message(process: Any) -> None:
    result = process.run(
        "from tests.sessions_ctx7.test_onloop import scenario_no_answer\n"
        "print(json.dumps(scenario_no_answer()))"
    )
    assert result["pending"] == [True, True]
    assert result["rows"] == [
        *exchanges("one"),
        [3, "user", "lost module"],
        [4, "user", "error answer"],
    ]


def scenario_one_session_at_once(turns: int) -> dict[str, Any]:
    from sessions_ctx7.models import Session

    async def main() -> dict[str, Any]:
        await _turn("c", "first")
        done = await asyncio.gather(
            *(_turn("c", f"m{i}") for i in range(turns)), return_exceptions=True
        )
        errors = [repr(item) for item in done if isinstance(item, BaseException)]
        stored = await _stored("c")
        session = await Session.objects.aget(session_id="c")
        return {
            "errors": errors,
            "seqs": [row[0] for row in stored],
            "seq": session.seq,
            "count": session.message_count,
            "pairs": all(
                stored[i][1] == "user" and stored[i + 1][2] == f"re: {stored[i][2]}"
                for i in range(len(stored) - 1)
                if stored[i][1] == "user"
            ),
        }

    return asyncio.run(main())


@pytest.mark.parametrize("cap", [5, 1000])
def test_concurrent_turns_on_one_session_lose_nothing_and_keep_the_cap(
    process: Any, cap: int
) -> None:
    result = process.run(
        "from tests.sessions_ctx7.test_onloop import scenario_one_session_at_once\n"
        "print(json.dumps(scenario_one_session_at_once(40)))",
        VX11_CONTEXT7_MAX_MESSAGES=cap,
    )
    assert result["errors"] == []
    assert result["seq"] == 82  # the first turn and forty more, two messages each
    assert result["count"] == min(cap, 82)
    assert result["seqs"] == list(range(82 - min(cap, 82) + 1, 83))
    assert result["pairs"]  # each reply right after its own user message


def scenario_behind_the_writer() -> dict[str, Any]:
    from sessions_ctx7 import services
    from sessions_ctx7.writer import writer

    async def main() -> dict[str, Any]:
        first = await _turn("o", "one")
        gate = threading.Event()

        def slow_append() -> bool:
            gate.wait(10)
            return services.append(
                first.session_pk, "assistant", "queued first", generation=first.generation
            )

        queued = writer.submit(slow_append, key="o")
        later = asyncio.ensure_future(_turn("o", "two"))
        await asyncio.sleep(0.3)
        held = not later.done()
        counted = [writer.has_jobs("o"), writer.has_jobs("other")]
        gate.set()
        await queued
        await later
        return {
            "held": held,
            "counted": counted,
            "after": writer.has_jobs("o"),
            "rows": await _stored("o"),
        }

    return asyncio.run(main())


def test_a_warm_turn_queues_behind_its_sessions_writer_jobs(process: Any) -> None:
    """A job of the session waits in the writer: the warm turn answered meanwhile is written
    after it. (On SQLite the writer's open transaction holds the loop off too; ``has_jobs``
    also covers the moment between two of the writer's batches.)"""
    result = process.run(
        "from tests.sessions_ctx7.test_onloop import scenario_behind_the_writer\n"
        "print(json.dumps(scenario_behind_the_writer()))"
    )
    assert result["held"] is True
    assert result["counted"] == [True, False] and result["after"] is False
    assert [row[2] for row in result["rows"]] == [
        "one",
        "re: one",
        "queued first",
        "two",
        "re: two",
    ]


def scenario_a_failing_pass() -> dict[str, Any]:
    from asgiref.sync import sync_to_async

    from sessions_ctx7.models import Message

    async def main() -> dict[str, Any]:
        first = await _turn("bad", "one")
        await _turn("fine", "one")

        def plant() -> None:  # where bad's next message goes; its session row left as it is
            Message.objects.create(
                session_id=first.session_pk,
                seq=3,
                role="user",
                content="planted",
                created_at=first.generation,
            )

        await sync_to_async(plant, thread_sensitive=False)()
        done = await asyncio.gather(
            _turn("fine", "two"),
            _turn("bad", "two"),
            _turn("fine", "three"),
            return_exceptions=True,
        )
        return {
            "outcomes": [type(item).__name__ for item in done],
            "fine": await _stored("fine"),
            "bad": await _stored("bad"),
        }

    return asyncio.run(main())


def test_a_pass_that_fails_is_rolled_back_and_written_once_by_the_writer(process: Any) -> None:
    """One turn's INSERT fails inside a pass on the loop: the pass is rolled back, the writer
    thread writes the others exactly once, the failing one not at all — and that turn's
    answer is not given as if it were stored: its finish raises (the proxy answers 500)."""
    result = process.run(
        "from tests.sessions_ctx7.test_onloop import scenario_a_failing_pass\n"
        "print(json.dumps(scenario_a_failing_pass()))"
    )
    assert result["outcomes"] == ["Turn", "IntegrityError", "Turn"]
    assert result["fine"] == exchanges("one", "two", "three")
    assert result["bad"] == [*exchanges("one"), [3, "user", "planted"]]


def scenario_near_expiry() -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    from gateway.core.problems import Forbidden
    from sessions_ctx7 import enrich
    from sessions_ctx7.models import Session

    t0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)

    async def turn(text: str, at: float, owner: str = OWNER) -> Any:
        now = t0 + timedelta(seconds=at)
        began = await enrich.begin(owner, _body(message=text), "x", now=now, budget=5)
        await enrich.finish(began, 200, JSON, _body(response=f"re: {text}"), now=now)
        return began

    async def main() -> dict[str, Any]:
        await turn("one", 0)  # cold; the session lives until t0 + 600 s
        warm = await turn("two", 10)  # far from its end: warm; lives until t0 + 610
        near = await turn("three", 580)  # 30 s left < 5 s budget + margin: open_turn
        row = await Session.objects.aget(session_id="x")
        refused = False
        try:  # after the expiry the turn began with, before the one it refreshed
            await enrich.begin(
                "client:2", _body(message="mine?"), "x", now=t0 + timedelta(seconds=620)
            )
        except Forbidden:
            refused = True
        return {
            "pending": [warm.pending is not None, near.pending is not None],
            "expires_in": (row.expires_at - t0).total_seconds(),
            "refused": refused,
        }

    return asyncio.run(main())


def test_a_turn_near_its_sessions_expiry_refreshes_it_before_the_module_is_called(
    process: Any,
) -> None:
    """A warm turn writes the expiry refresh at its end; so a session whose stored expiry
    would not outlive the turn goes through open_turn, which writes it first: another
    client naming the session meanwhile is refused (403), as before."""
    result = process.run(
        "from tests.sessions_ctx7.test_onloop import scenario_near_expiry\n"
        "print(json.dumps(scenario_near_expiry()))",
        VX11_CONTEXT7_TTL_SECONDS=600,
    )
    assert result["pending"] == [True, False]
    assert result["expires_in"] == 1180  # 580 + 600: refreshed when "three" began
    assert result["refused"] is True
