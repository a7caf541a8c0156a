"""Context-7 durability: a gateway killed with SIGKILL under load loses no answered turn;
two gateways on one database (each with its session cache) never lose or reorder a turn."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3

import httpx
import pytest
from aiohttp import web

from tests.reliability.conftest import OP, Gateways, figure, manage, pid_of
from tests.servers import UpstreamServer

pytestmark = pytest.mark.reliability

CLIENTS = 8


async def _reply(request: web.Request) -> web.Response:
    data = await request.json()
    return web.json_response({"response": f"re: {data.get('message', '')}"})


async def test_every_answered_turn_survives_a_sigkill_under_load(
    gateways: Gateways, echo: UpstreamServer
) -> None:
    """Clients talk on eight sessions at once; the gateway is killed mid-load. Every turn a
    client got an answer for — its message and the reply — is in the database file."""
    echo.default = _reply
    env = gateways.env(echo.url, VX11_CONTEXT7_MAX_MESSAGES=1_000_000)
    server = gateways.start(env)
    received: list[tuple[str, str, str]] = []
    stop = asyncio.Event()

    async def talk(i: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=OP, timeout=5) as client:
            n = 0
            while not stop.is_set():
                message = f"session {i} turn {n}"
                try:
                    answer = await client.post(
                        "/vx11/route/chat", json={"message": message, "session_id": f"kill-{i}"}
                    )
                except httpx.HTTPError:
                    return  # the gateway is gone
                if answer.status_code == 200:
                    received.append((f"kill-{i}", message, answer.json()["response"]))
                n += 1

    talkers = [asyncio.create_task(talk(i)) for i in range(CLIENTS)]
    await asyncio.sleep(1.5)
    os.kill(pid_of(server), signal.SIGKILL)
    assert server.proc is not None
    server.proc.wait(10)
    stop.set()
    await asyncio.gather(*talkers)

    path = env["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:  # what a restarted gateway reads
        stored = set(
            db.execute(
                "SELECT s.session_id, m.role, m.content FROM sessions_ctx7_message m "
                "JOIN sessions_ctx7_session s ON s.id = m.session_id"
            )
        )
    missing = [
        turn
        for turn in received
        if (turn[0], "user", turn[1]) not in stored or (turn[0], "assistant", turn[2]) not in stored
    ]
    figure(
        "context7-sigkill",
        f"{len(received)} answered turns on {CLIENTS} sessions before SIGKILL; "
        f"{len(stored)} messages in the database; missing: {len(missing)}",
    )
    assert len(received) > CLIENTS
    assert not missing, missing[:5]


EXPIRE = (
    "from sessions_ctx7 import services; from sessions_ctx7.models import Session; "
    "print(services.expire_now(list(Session.objects.filter(session_id='two').values_list('pk', "
    "flat=True))))"
)


async def test_two_gateways_writing_one_session_in_turn_keep_every_turn_in_order(
    gateways: Gateways, echo: UpstreamServer
) -> None:
    """Turns alternate between two gateway processes on one database (each caching the
    session after its first turn); then the admin's expire runs in a third process: the
    next turn, on either gateway, starts the session over."""
    seen: list[str] = []  # the context_summary of each call, as the module received it

    async def reply(request: web.Request) -> web.Response:
        data = await request.json()
        seen.append(data["metadata"]["context_summary"])
        return web.json_response({"response": f"re: {data.get('message', '')}"})

    echo.default = reply
    env = gateways.env(echo.url, VX11_CONTEXT7_MAX_MESSAGES=1_000_000)
    first, second = gateways.start(env), gateways.start(dict(env))
    sent: list[str] = []
    summaries: list[str] = []

    async def say(url: str, message: str) -> str:
        async with httpx.AsyncClient(base_url=url, headers=OP, timeout=10) as client:
            answer = await client.post(
                "/vx11/route/chat", json={"message": message, "session_id": "two"}
            )
        assert answer.status_code == 200, answer.text
        return seen[-1]

    for n in range(8):
        message = f"turn {n}"
        summaries.append(await say((first, second)[n % 2].url, message))
        sent.append(message)
    expected: list[tuple[str, str]] = []
    for message in sent:
        expected += [("user", message), ("assistant", f"re: {message}")]

    def history() -> list[tuple[str, str]]:
        path = env["DATABASE_URL"].removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            return list(
                db.execute(
                    "SELECT m.role, m.content FROM sessions_ctx7_message m JOIN "
                    "sessions_ctx7_session s ON s.id = m.session_id "
                    "WHERE s.session_id = 'two' ORDER BY m.seq"
                )
            )

    assert history() == expected
    # Each gateway saw the other's last turn although it had the session cached.
    assert summaries[-1] == "user: turn 6\nassistant: re: turn 6\nuser: turn 7"
    assert manage(env, "shell", "-c", EXPIRE).splitlines()[-1] == "1"
    summary = await say(first.url, "after the expiry")
    assert summary == "user: after the expiry"
    assert history() == [("user", "after the expiry"), ("assistant", "re: after the expiry")]
