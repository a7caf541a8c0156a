"""Context-7 rules at the database layer: expiry, restart, cap, summary, topic, cleanup."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from gateway.core.problems import Forbidden
from sessions_ctx7 import services
from sessions_ctx7.models import Message, Session

pytestmark = pytest.mark.db_backend
ALICE, BOB = "client:1", "client:2"


def contents(session_id: str) -> list[str]:
    return list(
        Message.objects.filter(session__session_id=session_id)
        .order_by("seq")
        .values_list("content", flat=True)
    )


def statements(ctx: CaptureQueriesContext) -> list[str]:
    """SQL statements run, without transaction control (SQLite's BEGIN IMMEDIATE)."""
    return [
        q["sql"]
        for q in ctx.captured_queries
        if not q["sql"].upper().startswith(("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"))
    ]


# --------------------------------------------------------------------------- expiry


def test_expiry_is_the_sooner_of_sliding_ttl_and_absolute_cap(gw_env, now):
    gw_env.set(VX11_CONTEXT7_TTL_SECONDS=60, VX11_CONTEXT7_MAX_AGE_SECONDS=100)
    start = now()
    assert services.expires_at_for(start, start) == start + timedelta(seconds=60)
    assert services.expires_at_for(start, start + timedelta(seconds=70)) == start + timedelta(
        seconds=100
    )


def test_sliding_ttl_keeps_an_active_session_and_ends_an_idle_one(db, gw_env, clock, now):
    gw_env.set(VX11_CONTEXT7_TTL_SECONDS=60, VX11_CONTEXT7_MAX_AGE_SECONDS=86400)
    services.open_turn(ALICE, "s1", "one", now=now())
    clock.advance(59)
    second = services.open_turn(ALICE, "s1", "two", now=now())
    assert not second.restarted
    assert contents("s1") == ["one", "two"]
    clock.advance(59)  # 59 s after the last activity: still alive
    assert not services.is_expired(Session.objects.get(session_id="s1"), now=now())
    clock.advance(1)  # 60 s idle: expired
    assert services.is_expired(Session.objects.get(session_id="s1"), now=now())
    third = services.open_turn(ALICE, "s1", "three", now=now())
    assert third.restarted
    assert contents("s1") == ["three"]


def test_absolute_cap_ends_a_session_that_never_idles(db, gw_env, clock, now):
    gw_env.set(VX11_CONTEXT7_TTL_SECONDS=60, VX11_CONTEXT7_MAX_AGE_SECONDS=100)
    services.open_turn(ALICE, "s1", "t0", now=now())
    clock.advance(50)
    assert not services.open_turn(ALICE, "s1", "t50", now=now()).restarted
    clock.advance(49)
    assert not services.open_turn(ALICE, "s1", "t99", now=now()).restarted
    session = Session.objects.get(session_id="s1")
    assert session.expires_at == session.created_at + timedelta(seconds=100)
    clock.advance(1)
    assert services.open_turn(ALICE, "s1", "t100", now=now()).restarted
    assert contents("s1") == ["t100"]


def test_an_expired_id_starts_fresh_under_the_same_id(db, gw_env, clock, now):
    gw_env.set(VX11_CONTEXT7_TTL_SECONDS=60)
    first = services.open_turn(ALICE, "keep-me", "old code question", now=now())
    services.append(first.pk, "assistant", "old answer", generation=first.generation, now=now())
    clock.advance(3600)
    fresh = services.open_turn(ALICE, "keep-me", "hello again", now=now())
    assert fresh.restarted and not fresh.created
    assert fresh.session_id == "keep-me"
    assert fresh.generation == now() != first.generation
    assert fresh.summary == "user: hello again"
    assert fresh.topic == "chat"
    session = Session.objects.get(session_id="keep-me")
    assert (session.message_count, session.created_at) == (1, now())
    assert contents("keep-me") == ["hello again"]


def test_a_late_reply_does_not_land_in_a_restarted_or_deleted_session(db, gw_env, clock, now):
    gw_env.set(VX11_CONTEXT7_TTL_SECONDS=60)
    turn = services.open_turn(ALICE, "s1", "question", now=now())
    clock.advance(61)
    assert not services.append(
        turn.pk, "assistant", "too late", generation=turn.generation, now=now()
    )
    services.open_turn(ALICE, "s1", "new question", now=now())
    assert not services.append(turn.pk, "assistant", "stale", generation=turn.generation, now=now())
    assert contents("s1") == ["new question"]
    Session.objects.all().delete()
    assert not services.append(turn.pk, "assistant", "gone", generation=turn.generation)


# --------------------------------------------------------------------------- ownership


def test_a_live_session_of_another_client_is_forbidden(db, now):
    services.open_turn(ALICE, "private", "secret", now=now())
    with pytest.raises(Forbidden):
        services.open_turn(BOB, "private", "let me in", now=now())
    assert contents("private") == ["secret"]


def test_an_expired_session_of_another_client_is_taken_over_empty(db, gw_env, clock, now):
    gw_env.set(VX11_CONTEXT7_TTL_SECONDS=60)
    services.open_turn(ALICE, "shared-name", "alice's words", now=now())
    clock.advance(120)
    opened = services.open_turn(BOB, "shared-name", "bob's words", now=now())
    assert opened.restarted
    assert Session.objects.get(session_id="shared-name").client == BOB
    assert contents("shared-name") == ["bob's words"]


# --------------------------------------------------------------------------- cap


def test_the_cap_keeps_the_newest_messages(db, gw_env, now):
    gw_env.set(VX11_CONTEXT7_MAX_MESSAGES=3)
    for i in range(7):
        services.open_turn(ALICE, "s1", f"m{i}", now=now())
    session = Session.objects.get(session_id="s1")
    assert (session.message_count, session.seq) == (3, 7)
    assert contents("s1") == ["m4", "m5", "m6"]
    assert list(Message.objects.filter(session=session).values_list("seq", flat=True)) == [5, 6, 7]


def test_a_lowered_cap_trims_on_the_next_append(db, gw_env, now):
    for i in range(6):
        services.open_turn(ALICE, "s1", f"m{i}", now=now())
    gw_env.set(VX11_CONTEXT7_MAX_MESSAGES=2)
    services.open_turn(ALICE, "s1", "m6", now=now())
    assert contents("s1") == ["m5", "m6"]
    assert Session.objects.get(session_id="s1").message_count == 2


# --------------------------------------------------------------------------- summary, topic


def test_summary_is_the_last_three_messages_truncated(db, now):
    turn = services.open_turn(ALICE, "s1", "first question", now=now())
    services.append(turn.pk, "assistant", "first answer", generation=turn.generation, now=now())
    services.open_turn(ALICE, "s1", "second\n  question", now=now())
    opened = services.open_turn(ALICE, "s1", "x" * 300, now=now())
    assert opened.summary == ("assistant: first answer\nuser: second question\nuser: " + "x" * 100)
    services.open_turn(ALICE, "s2", "y" * 300, now=now())
    services.open_turn(ALICE, "s2", "z" * 300, now=now())
    long = services.open_turn(ALICE, "s2", "w" * 300, now=now())
    assert len(long.summary) == 256
    assert long.summary.startswith("user: " + "y" * 100 + "\nuser: " + "z" * 100)


@pytest.mark.parametrize(
    ("text", "topic"),
    [
        ("Why does my Python function raise this exception?", "code"),
        ("Transcribe this audio file, the voice is noisy", "audio"),
        ("Open the website in the browser and click the first link", "browser"),
        ("The server is out of disk and memory, restart the service", "system"),
        ("hello, thanks for the chat", "chat"),
        ("What is the capital of France?", "general"),
        ("", "general"),
    ],
)
def test_topic_clustering(text, topic):
    assert services.classify_topic(text) == topic


def test_topic_clustering_counts_like_one_look_per_word_and_topic():
    """The word → topics map gives what counting every topic's keywords gives, ties (the
    first topic in TOPIC_KEYWORDS wins) and words of several topics included."""
    import random

    from sessions_ctx7.topics import TOPIC_KEYWORDS

    def reference(text: str) -> str:
        counts = dict.fromkeys(TOPIC_KEYWORDS, 0)
        for word in re.findall(r"[a-z0-9+#]+", text[:4096].lower()):
            for topic, words in TOPIC_KEYWORDS.items():
                counts[topic] += word in words
        best = max(counts.values())
        return "general" if best == 0 else next(t for t, c in counts.items() if c == best)

    vocabulary = [*sorted(set().union(*TOPIC_KEYWORDS.values())), "the", "of", "C++", "x" * 9]
    rng = random.Random(7)
    for _ in range(2000):
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 6)))
        assert services.classify_topic(text) == reference(text), text


def test_a_follow_up_without_keywords_keeps_the_topic(db, now):
    services.open_turn(ALICE, "s1", "refactor this javascript class", now=now())
    assert services.open_turn(ALICE, "s1", "ok, and then?", now=now()).topic == "code"
    assert services.open_turn(ALICE, "s1", "now play a song", now=now()).topic == "audio"
    assert Session.objects.get(session_id="s1").topic == "audio"


# --------------------------------------------------------------------------- cleanup


def test_clear_expired_deletes_expired_sessions_and_their_messages(db, gw_env, clock, now):
    gw_env.set(VX11_CONTEXT7_TTL_SECONDS=60)
    for sid, owner in [("a1", ALICE), ("a2", ALICE), ("b1", BOB)]:
        services.open_turn(owner, sid, "hi", now=now())
    clock.advance(30)
    services.open_turn(ALICE, "a3", "hi", now=now())
    clock.advance(45)  # a1, a2, b1 idle 75 s; a3 idle 45 s
    assert services.clear_expired(now=now(), owner=BOB) == 1
    assert services.clear_expired(now=now()) == 2
    assert services.clear_expired(now=now()) == 0
    assert list(Session.objects.values_list("session_id", flat=True)) == ["a3"]
    assert Message.objects.count() == 1


def test_expire_now_ends_sessions_for_the_next_cleanup(db, now):
    services.open_turn(ALICE, "s1", "hi", now=now())
    services.open_turn(ALICE, "s2", "hi", now=now())
    pk = Session.objects.get(session_id="s1").pk
    assert services.expire_now([pk], now=now()) == 1
    assert services.expire_now([pk], now=now()) == 0  # already over
    assert services.clear_expired(now=now()) == 1
    assert list(Session.objects.values_list("session_id", flat=True)) == ["s2"]


# --------------------------------------------------------------------------- cost


def test_a_turn_costs_three_statements(db, gw_env, now):
    gw_env.set(VX11_CONTEXT7_MAX_MESSAGES=2)
    with CaptureQueriesContext(connection) as new:
        turn = services.open_turn(ALICE, "s1", "one", now=now())
    with CaptureQueriesContext(connection) as existing:
        services.open_turn(ALICE, "s1", "two", now=now())
    with CaptureQueriesContext(connection) as reply_at_cap:  # recycles the oldest row
        services.append(turn.pk, "assistant", "three", generation=turn.generation, now=now())
    assert len(statements(new)) == 3
    assert len(statements(existing)) == 3
    assert len(statements(reply_at_cap)) == 3
    assert contents("s1") == ["two", "three"]
