"""The proxy hook: body parsing, session ids, enrichment, replies (no HTTP)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async

from gateway.core.problems import Forbidden, InvalidRequest
from sessions_ctx7 import enrich
from sessions_ctx7.models import Message, Session

ALICE, BOB = "client:1", "client:2"
pytestmark = pytest.mark.usefixtures("transactional_db")


@sync_to_async
def rows(session_id: str) -> list[tuple[str, str]]:
    return list(
        Message.objects.filter(session__session_id=session_id)
        .order_by("seq")
        .values_list("role", "content")
    )


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


async def test_begin_enriches_the_clients_object():
    turn = await enrich.begin(
        ALICE, body(message="fix my python bug", temperature=0.2, metadata={"lang": "en"}), None
    )
    sent = orjson.loads(turn.body)
    assert sent == {
        "message": "fix my python bug",
        "temperature": 0.2,
        "session_id": turn.session_id,
        "metadata": {"lang": "en", "context_summary": "user: fix my python bug", "topic": "code"},
    }
    assert turn.created and len(turn.session_id) == 32
    assert await rows(turn.session_id) == [("user", "fix my python bug")]


async def test_second_turn_carries_the_first_in_its_summary():
    first = await enrich.begin(ALICE, body(prompt="hello there"), "conv-1")
    await enrich.finish(first, 200, "application/json", body(response="hi, how can I help?"))
    second = await enrich.begin(ALICE, body(prompt="tell me a joke"), "conv-1")
    meta = orjson.loads(second.body)["metadata"]
    assert meta["context_summary"] == (
        "user: hello there\nassistant: hi, how can I help?\nuser: tell me a joke"
    )
    assert not second.created


async def test_body_session_id_wins_over_the_header():
    turn = await enrich.begin(ALICE, body(session_id="from-body", message="x"), "from-header")
    assert turn.session_id == "from-body"
    assert await sync_to_async(Session.objects.filter(session_id="from-header").exists)() is False


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"\xff\xfe",
        b'{"a": 1,}',
        b"[1, 2]",
        b'"text"',
        b"42",
        b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
async def test_a_body_that_is_not_a_json_object_is_refused(raw):
    with pytest.raises(InvalidRequest):
        await enrich.begin(ALICE, raw, None)
    assert await sync_to_async(Session.objects.count)() == 0


async def test_an_empty_body_counts_as_an_empty_object():
    turn = await enrich.begin(ALICE, b"  ", "s-empty")
    assert orjson.loads(turn.body) == {
        "session_id": "s-empty",
        "metadata": {"context_summary": "", "topic": "general"},
    }
    assert await rows("s-empty") == []


@pytest.mark.parametrize(
    ("fields", "header"),
    [
        ({"session_id": ""}, None),
        ({"session_id": "a" * 129}, None),
        ({"session_id": 42}, None),
        ({"session_id": "has space"}, None),
        ({}, "semi;colon"),
        ({}, "slash/no"),
    ],
)
async def test_a_bad_session_id_is_refused(fields, header):
    with pytest.raises(InvalidRequest, match="session_id"):
        await enrich.begin(ALICE, body(message="x", **fields), header)


async def test_the_longest_allowed_id_and_every_allowed_character_work():
    sid = ("Az09._:-" * 16)[:128]
    assert (await enrich.begin(ALICE, body(message="x"), sid)).session_id == sid


async def test_another_clients_live_session_is_forbidden():
    await enrich.begin(ALICE, body(message="mine"), "alice-1")
    with pytest.raises(Forbidden):
        await enrich.begin(BOB, body(message="peek"), "alice-1")
    assert await rows("alice-1") == [("user", "mine")]


async def test_non_string_messages_are_stored_as_json_and_odd_metadata_is_kept():
    turn = await enrich.begin(ALICE, body(message={"text": "hi"}, metadata="v2"), "s1")
    assert await rows("s1") == [("user", '{"text":"hi"}')]
    assert orjson.loads(turn.body)["metadata"]["client_metadata"] == "v2"


async def test_finish_stores_the_reply_and_adds_the_session_id():
    turn = await enrich.begin(ALICE, body(message="q"), "s1")
    out = await enrich.finish(
        turn, 200, "application/json; charset=utf-8", body(response="the answer", tokens=3)
    )
    assert orjson.loads(out) == {"response": "the answer", "tokens": 3, "session_id": "s1"}
    assert await rows("s1") == [("user", "q"), ("assistant", "the answer")]


async def test_finish_falls_back_to_the_message_field_and_keeps_an_existing_session_id():
    turn = await enrich.begin(ALICE, body(message="q"), "s1")
    answer = b'{"message": "from message", "session_id": "upstream-own"}'
    assert await enrich.finish(turn, 201, "application/json", answer) == answer
    assert await rows("s1") == [("user", "q"), ("assistant", "from message")]


@pytest.mark.parametrize("status", [400, 429, 500, 503, 504])
async def test_an_upstream_error_stores_no_assistant_message(status):
    turn = await enrich.begin(ALICE, body(message="q"), "s1")
    answer = body(response="I failed", error="boom")
    assert await enrich.finish(turn, status, "application/json", answer) == answer
    assert await rows("s1") == [("user", "q")]


@pytest.mark.parametrize(
    ("content_type", "answer"),
    [
        ("text/plain", b'{"response": "looks like json"}'),
        ("application/json", b"[1, 2, 3]"),
        ("application/json", b"not json at all"),
        (None, b"\x00\x01binary"),
    ],
)
async def test_non_object_answers_pass_through_untouched(content_type, answer):
    turn = await enrich.begin(ALICE, body(message="q"), "s1")
    assert await enrich.finish(turn, 200, content_type, answer) == answer
    assert await rows("s1") == [("user", "q")]


async def test_sessions_survive_a_fresh_event_loop_and_connections():
    """State lives in the database, not in the process: new connections see it."""
    from django.db import connections

    from gateway.config.snapshot import holder

    await enrich.begin(ALICE, body(message="remember me"), "durable")
    holder.invalidate()
    await sync_to_async(connections.close_all, thread_sensitive=False)()
    turn = await enrich.begin(ALICE, body(message="do you?"), "durable")
    assert (
        orjson.loads(turn.body)["metadata"]["context_summary"] == "user: remember me\nuser: do you?"
    )
