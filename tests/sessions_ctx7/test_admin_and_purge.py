"""Admin pages for sessions and the ``purge_context7`` command."""

from __future__ import annotations

import io
from datetime import timedelta

from django.core.management import call_command
from django.utils import timezone

from sessions_ctx7 import services
from sessions_ctx7.models import Session

URL = "/admin/sessions_ctx7/session/"


def make_sessions() -> None:
    services.open_turn("client:1", "live-one", "debug my rust compiler error")
    services.open_turn("client:2", "live-two", "hello")
    services.open_turn("client:1", "old-one", "play music", now=timezone.now() - timedelta(days=3))


def test_the_changelist_shows_ttl_left_and_filters_expired(admin_client):
    make_sessions()
    page = admin_client.get(URL).content.decode()
    assert "TTL left" in page and "live-one" in page and "old-one" in page
    assert "59m" in page  # a fresh session has about an hour left
    expired = admin_client.get(URL, {"expired": "yes"}).content.decode()
    assert "old-one" in expired and "live-one" not in expired
    alive = admin_client.get(URL, {"expired": "no"}).content.decode()
    assert "live-one" in alive and "live-two" in alive and "old-one" not in alive


def test_search_finds_sessions_by_id_and_by_message_content(admin_client):
    make_sessions()
    by_content = admin_client.get(URL, {"q": "compiler"}).content.decode()
    assert "live-one" in by_content and "live-two" not in by_content
    by_id = admin_client.get(URL, {"q": "live-two"}).content.decode()
    assert "live-two" in by_id and "live-one" not in by_id


def test_a_session_page_shows_its_messages_read_only(admin_client):
    make_sessions()
    session = Session.objects.get(session_id="live-one")
    r = admin_client.get(f"{URL}{session.pk}/change/")
    assert r.status_code == 200
    page = r.content.decode()
    assert "debug my rust compiler error" in page
    assert "user: debug my rust compiler error" in page  # the summary
    assert 'name="messages-0-content"' not in page  # no editable inline fields
    assert f"{URL}add/" not in admin_client.get(URL).content.decode()  # sessions come from traffic


def test_the_expire_now_action_ends_sessions(admin_client):
    make_sessions()
    pk = Session.objects.get(session_id="live-two").pk
    r = admin_client.post(URL, {"action": "expire_now", "_selected_action": [pk]}, follow=True)
    assert r.status_code == 200
    assert "1 session(s) expired." in r.content.decode()
    assert services.is_expired(Session.objects.get(pk=pk))
    assert not services.is_expired(Session.objects.get(session_id="live-one"))


def test_purge_command_prints_how_many_it_removed(db):
    make_sessions()
    out = io.StringIO()
    call_command("purge_context7", stdout=out)
    assert out.getvalue().strip() == "Removed 1 expired Context-7 session(s)."
    assert sorted(Session.objects.values_list("session_id", flat=True)) == ["live-one", "live-two"]
    out = io.StringIO()
    call_command("purge_context7", stdout=out)
    assert "Removed 0 " in out.getvalue()
