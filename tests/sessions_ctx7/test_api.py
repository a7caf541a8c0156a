"""The Context-7 management API through the live gateway."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from sessions_ctx7 import services
from sessions_ctx7.models import Session

PROBLEM = "application/problem+json"


@pytest.fixture
def people(make_client):
    """Two normal clients and an admin client: (owner key, headers) each."""
    out = {}
    for name, admin in [("alice", False), ("bob", False), ("root", True)]:
        client, token = make_client(name, is_admin=admin)
        out[name] = (f"client:{client.pk}", {"X-VX11-Token": token})
    return out


def test_a_client_lists_only_its_own_sessions(http, people):
    alice, alice_h = people["alice"]
    bob, _ = people["bob"]
    services.open_turn(alice, "a1", "my python bug")
    services.open_turn(alice, "a2", "hello")
    services.open_turn(bob, "b1", "bob's secret")
    r = http.get("/vx11/context-7/sessions", headers=alice_h)
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["total"] == 2
    assert {s["session_id"] for s in page["sessions"]} == {"a1", "a2"}
    item = next(s for s in page["sessions"] if s["session_id"] == "a1")
    assert item["message_count"] == 1 and item["topic"] == "code"
    assert {"created_at", "expires_at", "last_activity", "client"} <= item.keys()


def test_the_list_is_paginated_with_a_total(http, people):
    alice, headers = people["alice"]
    start = timezone.now()
    for i in range(5):
        services.open_turn(alice, f"s{i}", "hi", now=start + timedelta(seconds=i))
    r = http.get("/vx11/context-7/sessions", params={"limit": 2, "offset": 1}, headers=headers)
    page = r.json()
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)
    assert [s["session_id"] for s in page["sessions"]] == ["s3", "s2"]  # newest activity first
    assert (
        http.get("/vx11/context-7/sessions", params={"limit": 0}, headers=headers).status_code
        == 400
    )


def test_an_admin_sees_every_session_and_can_filter_by_client(http, people):
    alice, _ = people["alice"]
    bob, _ = people["bob"]
    _, root_h = people["root"]
    services.open_turn(alice, "a1", "x")
    services.open_turn(bob, "b1", "y")
    assert http.get("/vx11/context-7/sessions", headers=root_h).json()["total"] == 2
    page = http.get("/vx11/context-7/sessions", params={"client": bob}, headers=root_h).json()
    assert [s["session_id"] for s in page["sessions"]] == ["b1"]


def test_expired_sessions_are_hidden_unless_asked_for(http, people):
    alice, headers = people["alice"]
    services.open_turn(alice, "old", "x", now=timezone.now() - timedelta(days=2))
    services.open_turn(alice, "new", "y")
    assert http.get("/vx11/context-7/sessions", headers=headers).json()["total"] == 1
    page = http.get(
        "/vx11/context-7/sessions", params={"include_expired": "true"}, headers=headers
    ).json()
    assert page["total"] == 2
    r = http.get("/vx11/context-7/sessions/old", headers=headers)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_a_session_reads_with_messages_and_summary(http, people):
    alice, headers = people["alice"]
    turn = services.open_turn(alice, "a1", "question one")
    services.append(
        turn.pk, "assistant", "answer one", generation=turn.generation, metadata={"status": 200}
    )
    r = http.get("/vx11/context-7/sessions/a1", headers=headers)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["session_id"] == "a1" and data["message_count"] == 2
    assert data["summary"] == "user: question one\nassistant: answer one"
    assert [(m["role"], m["content"]) for m in data["messages"]] == [
        ("user", "question one"),
        ("assistant", "answer one"),
    ]
    assert data["messages"][1]["metadata"] == {"status": 200}
    assert data["messages"][0]["timestamp"]


def test_another_clients_session_is_forbidden_to_read_and_delete(http, people):
    alice, _ = people["alice"]
    _, bob_h = people["bob"]
    services.open_turn(alice, "a1", "private")
    for method in ("GET", "DELETE"):
        r = http.request(method, "/vx11/context-7/sessions/a1", headers=bob_h)
        assert r.status_code == 403, r.text
        assert r.headers["content-type"].startswith(PROBLEM)
        assert r.json()["error"] == "forbidden"
        assert "private" not in r.text
    assert Session.objects.filter(session_id="a1").exists()


def test_an_admin_may_read_any_session(http, people):
    alice, _ = people["alice"]
    _, root_h = people["root"]
    services.open_turn(alice, "a1", "private")
    assert http.get("/vx11/context-7/sessions/a1", headers=root_h).json()["client"] == alice


def test_unknown_sessions_are_404_problems(http, people):
    _, headers = people["alice"]
    for sid in ("nope", "bad%20id"):
        r = http.get(f"/vx11/context-7/sessions/{sid}", headers=headers)
        assert r.status_code == 404
        assert r.json()["error"] == "not_found"


def test_delete_removes_a_session_and_its_messages(http, people):
    alice, headers = people["alice"]
    services.open_turn(alice, "a1", "bye")
    assert http.delete("/vx11/context-7/sessions/a1", headers=headers).status_code == 204
    assert not Session.objects.filter(session_id="a1").exists()
    assert http.delete("/vx11/context-7/sessions/a1", headers=headers).status_code == 404


def test_cleanup_returns_how_many_expired_sessions_it_removed(http, people):
    alice, alice_h = people["alice"]
    bob, _ = people["bob"]
    _, root_h = people["root"]
    past = timezone.now() - timedelta(days=2)
    for sid, owner in [("a-old-1", alice), ("a-old-2", alice), ("b-old", bob)]:
        services.open_turn(owner, sid, "x", now=past)
    services.open_turn(alice, "a-live", "y")
    r = http.post("/vx11/context-7/cleanup", headers=alice_h)
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": 2}  # a client cleans its own
    assert http.post("/vx11/context-7/cleanup", headers=root_h).json() == {"deleted": 1}
    assert http.post("/vx11/context-7/cleanup", headers=root_h).json() == {"deleted": 0}
    assert list(Session.objects.values_list("session_id", flat=True)) == ["a-live"]


def test_the_api_needs_a_token(http):
    r = http.get("/vx11/context-7/sessions")
    assert r.status_code == 401 and r.json()["error"] == "auth_required"
    r = http.post("/vx11/context-7/cleanup", headers={"X-VX11-Token": "wrong"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


def test_operator_tokens_are_admins(http, operator_headers, people):
    alice, _ = people["alice"]
    services.open_turn(alice, "a1", "x")
    assert http.get("/vx11/context-7/sessions", headers=operator_headers).json()["total"] == 1
