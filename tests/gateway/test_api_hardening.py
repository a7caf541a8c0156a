"""Hostile input on the management API and the Context-7 path (issue #12, items 9 and 15).

The database-layer tests are marked ``db_backend``: ``./run test`` runs them again on a
real PostgreSQL, where a NUL in a text value is a ``DataError`` (SQLite stores it).
"""

from __future__ import annotations

import json

import pytest
from django.core.exceptions import ValidationError

from gateway.models import Module, Route
from sessions_ctx7.models import Message, Session

CHAT = "/vx11/route/chat"


def is_problem(response, status: int, error: str) -> bool:
    return bool(
        response.status_code == status
        and response.headers.get("content-type") == "application/problem+json"
        and response.json().get("error") == error
    )


# --------------------------------------------------------------------------- NUL in a prompt


@pytest.mark.db_backend
@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "hello\\u0000world"}',
        b'{"message": "\\u0000"}',
        b'{"message": "fine", "prompt": "never read"}',  # control: this one passes
    ],
    ids=["prompt", "message", "control"],
)
def test_a_nul_in_the_stored_message_is_refused_before_anything_is_stored(
    http, upstream, operator_headers, body
):
    headers = {**operator_headers, "Content-Type": "application/json"}
    r = http.post(CHAT, content=body, headers=headers)
    if b"\\u0000" not in body:
        assert r.status_code == 200, r.text
        assert Session.objects.count() == 1
        return
    assert is_problem(r, 400, "invalid_request"), r.text
    assert "NUL" in r.json()["detail"]
    assert upstream.seen == []  # nothing forwarded
    assert Session.objects.count() == 0 and Message.objects.count() == 0  # nothing stored


@pytest.mark.db_backend
def test_a_nul_in_the_modules_reply_reaches_the_client_and_is_stored_safely(
    http, upstream, operator_headers
):
    upstream.respond("POST", "/switch/route-v5", body={"response": "a\u0000b"})
    r = http.post(CHAT, json={"prompt": "hi", "session_id": "nul-reply"}, headers=operator_headers)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == "a\u0000b"  # the module's answer, unchanged
    stored = list(
        Message.objects.filter(session__session_id="nul-reply")
        .order_by("seq")
        .values_list("role", "content")
    )
    assert stored == [("user", "hi"), ("assistant", "a\ufffdb")]


# --------------------------------------------------------------------------- odd path parameters


@pytest.mark.db_backend
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
@pytest.mark.parametrize("intent", ["%00", "chat%00", "chat%0A", "%E2%98%83"])
def test_a_route_path_that_cannot_name_an_intent_is_not_found(
    http, operator_headers, method, intent
):
    r = http.request(
        method, f"/vx11/routes/{intent}", json={"timeout": 3}, headers=operator_headers
    )
    assert is_problem(r, 404, "not_found"), r.text
    assert Route.objects.count() == 0


@pytest.mark.db_backend
@pytest.mark.parametrize("intent", ["%00", "chat%0A"])
def test_put_on_an_intent_that_cannot_exist_is_a_400_naming_intent(http, operator_headers, intent):
    r = http.put(
        f"/vx11/routes/{intent}",
        json={"module": "switch", "endpoint": "/x"},
        headers=operator_headers,
    )
    assert is_problem(r, 400, "invalid_request"), r.text
    assert "intent" in r.json()["errors"]
    assert Route.objects.count() == 0


@pytest.mark.db_backend
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_session_path_with_a_nul_or_newline_is_not_found(http, operator_headers, method):
    Session.objects.create(
        session_id="abc",
        client="operator",
        created_at="2026-01-01T00:00:00Z",
        last_activity="2026-01-01T00:00:00Z",
        expires_at="2999-01-01T00:00:00Z",
    )
    for sid in ("%00", "abc%00", "abc%0A"):
        r = http.request(method, f"/vx11/context-7/sessions/{sid}", headers=operator_headers)
        assert is_problem(r, 404, "not_found"), (sid, r.text)
    assert Session.objects.filter(session_id="abc").exists()


@pytest.mark.db_backend
@pytest.mark.parametrize("client", ["%00", "client:1%00", "a%0Ab"])
def test_an_owner_filter_that_cannot_be_an_owner_id_is_a_400(http, operator_headers, client):
    r = http.get(f"/vx11/context-7/sessions?client={client}", headers=operator_headers)
    assert is_problem(r, 400, "invalid_request"), r.text
    assert "client" in r.json()["errors"]
    ok = http.get("/vx11/context-7/sessions?client=client:1", headers=operator_headers)
    assert ok.status_code == 200 and ok.json()["total"] == 0


@pytest.mark.db_backend
def test_a_session_id_with_a_trailing_newline_is_refused(http, upstream, operator_headers):
    r = http.post(CHAT, json={"prompt": "hi", "session_id": "abc\n"}, headers=operator_headers)
    assert is_problem(r, 400, "invalid_request"), r.text
    assert upstream.seen == [] and Session.objects.count() == 0


# --------------------------------------------------------------------------- endpoint characters


BAD_ENDPOINTS = ["/switch/task☃", "/switch/tab\there", "/switch/del\x7f", "/switch/nul\x00"]


@pytest.mark.db_backend
@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_an_endpoint_outside_printable_ascii_is_refused_at_write_time(
    http, operator_headers, endpoint
):
    r = http.patch("/vx11/routes/task", json={"endpoint": endpoint}, headers=operator_headers)
    assert is_problem(r, 400, "invalid_request"), r.text
    assert "endpoint" in r.json()["errors"]
    r = http.post(
        "/vx11/routes",
        json={"intent": "snow", "module": "switch", "endpoint": endpoint},
        headers=operator_headers,
    )
    assert is_problem(r, 400, "invalid_request"), r.text
    assert "endpoint" in r.json()["errors"]
    assert Route.objects.count() == 0


@pytest.mark.db_backend
def test_a_percent_encoded_endpoint_is_accepted_and_proxied(http, upstream, operator_headers):
    r = http.patch(
        "/vx11/routes/task", json={"endpoint": "/switch/task%E2%98%83"}, headers=operator_headers
    )
    assert r.status_code == 201, r.text
    r = http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert r.status_code == 200, r.text
    assert upstream.seen[-1].path == "/switch/task☃"  # aiohttp decodes the path it got


@pytest.mark.db_backend
def test_a_row_stored_before_validation_is_proxied_percent_encoded(
    http, upstream, operator_headers
):
    """A legacy row (written before the check, or by raw SQL) is repaired, not a 500."""
    Route.objects.bulk_create([Route(intent="task", endpoint="/switch/task☃")])  # no validators
    r = http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert r.status_code == 200, r.text
    assert upstream.seen[-1].path == "/switch/task☃"
    assert http.get("/vx11/routes/task", headers=operator_headers).json()["endpoint"] == (
        "/switch/task%E2%98%83"
    )


@pytest.mark.db_backend
@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_the_model_validators_refuse_the_same_endpoints(db, endpoint):
    """The admin saves through ``full_clean``: it cannot store what the API refuses."""
    with pytest.raises(ValidationError) as caught:
        Route(intent="task", endpoint=endpoint).full_clean()
    assert "endpoint" in caught.value.message_dict
    with pytest.raises(ValidationError) as caught:
        Module(name="snow", health_path=endpoint).full_clean()
    assert "health_path" in caught.value.message_dict


@pytest.mark.db_backend
def test_the_admin_form_refuses_a_non_ascii_endpoint(admin_client):
    r = admin_client.post(
        "/admin/gateway/route/add/",
        {"intent": "task", "endpoint": "/switch/task☃", "enabled": "on"},
    )
    assert r.status_code == 200  # the form again, with its error
    assert "printable ASCII" in r.content.decode()
    assert Route.objects.count() == 0


@pytest.mark.parametrize("value", ["chat\n", "switch\n"])
def test_names_with_a_trailing_newline_are_refused(value):
    from gateway.config.validation import validate_intent, validate_module_name

    with pytest.raises(ValidationError):
        validate_intent(value)
    with pytest.raises(ValidationError):
        validate_module_name(value)


# --------------------------------------------------------------------------- unknown fields


@pytest.mark.db_backend
@pytest.mark.parametrize("method", ["PATCH", "PUT"])
def test_an_unknown_field_is_refused_with_its_name_and_nothing_is_saved(
    http, operator_headers, method
):
    r = http.request(
        method,
        "/vx11/routes/task",
        json={"timeoutt": 5, "priority": "other"},
        headers=operator_headers,
    )
    assert is_problem(r, 400, "invalid_request"), r.text
    assert r.json()["errors"] == {"timeoutt": ["Unknown field."]}
    assert "timeoutt" in r.json()["detail"]
    assert Route.objects.count() == 0


@pytest.mark.db_backend
def test_post_with_unknown_fields_names_every_one(http, operator_headers):
    r = http.post(
        "/vx11/routes",
        json={"intent": "snow", "module": "switch", "endpoint": "/x", "zeta": 1, "alpha": 2},
        headers=operator_headers,
    )
    assert is_problem(r, 400, "invalid_request"), r.text
    assert set(r.json()["errors"]) == {"alpha", "zeta"}
    assert Route.objects.count() == 0


@pytest.mark.db_backend
def test_a_route_read_back_can_be_written_back_unchanged(http, operator_headers):
    """``source`` (read-only, from GET) is accepted and ignored, so GET → PUT round-trips."""
    entry = http.get("/vx11/routes/task", headers=operator_headers).json()
    entry["timeout"] = 7
    r = http.put("/vx11/routes/task", json=entry, headers=operator_headers)
    assert r.status_code == 201, r.text
    assert r.json()["timeout"] == 7 and r.json()["source"] == "database"


@pytest.mark.db_backend
def test_a_body_intent_other_than_the_paths_is_refused(http, operator_headers):
    r = http.patch(
        "/vx11/routes/task", json={"intent": "chat", "timeout": 3}, headers=operator_headers
    )
    assert is_problem(r, 400, "invalid_request"), r.text
    assert "intent" in r.json()["errors"]
    assert Route.objects.count() == 0


@pytest.mark.db_backend
@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "/admin/sessions_ctx7/session/?client=%00",
        "/admin/gateway/apiclient/?q=a%00b",
        "/admin/gateway/breakertransition/?module=%00",
    ],
)
def test_a_nul_in_an_admin_query_string_is_a_400_not_a_500(admin_client, url):
    """PostgreSQL text cannot hold a NUL: the admin's own filters used to end in a 500."""
    r = admin_client.get(url)
    assert r.status_code == 400, r.content[:300]
    assert r["Content-Type"] == "application/problem+json"
    assert json.loads(r.content)["error"] == "invalid_request"


@pytest.mark.django_db
def test_an_ordinary_admin_query_string_still_works(admin_client):
    assert admin_client.get("/admin/sessions_ctx7/session/?q=abc").status_code == 200
