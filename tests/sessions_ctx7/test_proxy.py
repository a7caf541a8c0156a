"""Context-7 on the proxy path: ``POST /vx11/route/chat`` through the live gateway."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from sessions_ctx7.models import Message, Session

CHAT = "/vx11/route/chat"
UPSTREAM = "/switch/route-v5"


@pytest.fixture
def alice(make_client):
    client, token = make_client("alice")
    return f"client:{client.pk}", {"X-VX11-Token": token}


def stored(session_id: str) -> list[tuple[str, str]]:
    return list(
        Message.objects.filter(session__session_id=session_id)
        .order_by("seq")
        .values_list("role", "content")
    )


def test_a_two_turn_conversation_carries_context_upstream(http, upstream, alice):
    _, headers = alice
    upstream.respond("POST", UPSTREAM, body={"response": "Use a virtualenv."})
    r1 = http.post(CHAT, json={"message": "How do I install python packages?"}, headers=headers)
    assert r1.status_code == 200, r1.text
    sid = r1.headers["x-vx11-session"]
    assert r1.json() == {"response": "Use a virtualenv.", "session_id": sid}
    first = upstream.seen[-1].json()
    assert first["session_id"] == sid
    assert first["metadata"] == {
        "context_summary": "user: How do I install python packages?",
        "topic": "code",
    }

    r2 = http.post(CHAT, json={"message": "And then?"}, headers={**headers, "X-VX11-Session": sid})
    assert r2.status_code == 200, r2.text
    assert r2.headers["x-vx11-session"] == sid
    second = upstream.seen[-1].json()
    assert second["metadata"]["context_summary"] == (
        "user: How do I install python packages?\nassistant: Use a virtualenv.\nuser: And then?"
    )
    assert second["metadata"]["topic"] == "code"
    assert stored(sid) == [
        ("user", "How do I install python packages?"),
        ("assistant", "Use a virtualenv."),
        ("user", "And then?"),
        ("assistant", "Use a virtualenv."),
    ]


def test_client_fields_and_metadata_reach_the_upstream(http, upstream, alice):
    _, headers = alice
    r = http.post(
        CHAT,
        json={"prompt": "play a song", "session_id": "mine-1", "n": 2, "metadata": {"lang": "es"}},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-session"] == "mine-1"
    sent = upstream.seen[-1].json()
    assert sent["prompt"] == "play a song" and sent["n"] == 2 and sent["session_id"] == "mine-1"
    assert sent["metadata"] == {
        "lang": "es",
        "context_summary": "user: play a song",
        "topic": "audio",
    }


def test_an_upstream_error_is_not_stored_as_a_reply(http, upstream, alice):
    _, headers = alice
    upstream.respond("POST", UPSTREAM, status=503, body={"response": "overloaded"})
    # chat falls back to madre (SPEC §19): madre fails too, so the client gets switch's error.
    upstream.respond("POST", "/madre/chat", status=503, body={"response": "madre down"})
    r = http.post(CHAT, json={"message": "hi"}, headers={**headers, "X-VX11-Session": "s503"})
    assert r.status_code == 503
    assert r.json() == {"response": "overloaded"}  # the module's answer, unchanged
    assert stored("s503") == [("user", "hi")]


def test_another_clients_session_is_forbidden(http, make_client, alice):
    _, alice_h = alice
    _, bob_token = make_client("bob")
    assert (
        http.post(
            CHAT, json={"message": "secret plan"}, headers={**alice_h, "X-VX11-Session": "alice-s"}
        ).status_code
        == 200
    )
    r = http.post(
        CHAT,
        json={"message": "show me", "session_id": "alice-s"},
        headers={"X-VX11-Token": bob_token},
    )
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["error"] == "forbidden"
    assert stored("alice-s") == [("user", "secret plan")]  # bob's message was not added


@pytest.mark.parametrize(
    ("content", "header"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}", None),
        (b'{"message": "x"}', "bad id!"),
    ],
)
def test_bad_bodies_and_ids_are_400_problems(http, upstream, alice, content, header):
    _, headers = alice
    extra = {"X-VX11-Session": header} if header else {}
    r = http.post(
        CHAT, content=content, headers={**headers, **extra, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["error"] == "invalid_request"
    assert upstream.seen == []


def test_disabled_context7_forwards_the_body_untouched(http, upstream, gw_env, alice):
    _, headers = alice
    gw_env.set(VX11_CONTEXT7_ENABLED="false")
    raw = b'{"message": "hi",   "session_id": "s-off"}'
    r = http.post(CHAT, content=raw, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert "x-vx11-session" not in r.headers
    assert upstream.seen[-1].body == raw
    assert "session_id" not in r.json()  # the echo answer, not enriched
    assert not Session.objects.exists()


async def _hang_up(request: web.Request) -> web.StreamResponse:
    """A module that dies mid-call: the connection closes with no answer."""
    assert request.transport is not None
    request.transport.close()
    await asyncio.sleep(1)
    return web.Response()


def test_a_turn_the_module_never_answers_keeps_the_users_message(http, upstream, alice):
    """On a warm session the user's message is written with the reply; with no reply at
    all (the module and its fallback hang up) it is written alone, before the 502."""
    _, headers = alice
    upstream.respond("POST", UPSTREAM, body={"response": "fine"})
    turn = {**headers, "X-VX11-Session": "hung"}
    for text in ("one", "two"):
        assert http.post(CHAT, json={"message": text}, headers=turn).status_code == 200
    upstream.route("POST", UPSTREAM, _hang_up)
    upstream.route("POST", "/madre/chat", _hang_up)
    r = http.post(CHAT, json={"message": "three"}, headers=turn)
    assert r.status_code in (502, 503), r.text
    assert stored("hung") == [
        ("user", "one"),
        ("assistant", "fine"),
        ("user", "two"),
        ("assistant", "fine"),
        ("user", "three"),
    ]
