"""Fallback chains (SPEC §19): a route's module, then each fallback, until one answers.

Every module of the live gateway points at one real upstream server (the ``gateway``
fixture); the modules are told apart by the paths they are sent (``/switch/...`` for the
primary, ``/madre/...`` for the fallback). "Switch down" points switch at a closed port.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from aiohttp import web

from gateway.config.routes import CODE_ROUTES
from gateway.models import Route
from gateway.operations.config_apply import import_document
from gateway.operations.config_doc import DocumentError
from tests.conftest import OPERATOR_TOKEN
from tests.gateway.test_metrics import scrape
from tests.servers import UpstreamServer, free_port

OP = {"X-VX11-Token": OPERATOR_TOKEN}
MADRE_CHAT = "/madre/chat"
FOUR = ("madre", "hermes", "mcp", "shub")


def switch_down(gw_env) -> None:
    gw_env.set(VX11_MODULE_SWITCH_URL=f"http://127.0.0.1:{free_port()}")


def paths(upstream) -> list[str]:
    return [s.path for s in upstream.seen]


def fallbacks_metric(http, **labels: str) -> float:
    return scrape(http).value("vx11_fallbacks_total", **labels)


def task_route(**fields: object) -> Route:
    """``task`` (switch, no Context-7) with a fallback to madre."""
    defaults: dict[str, object] = {"fallbacks": [{"module": "madre", "endpoint": "/madre/task"}]}
    return Route.objects.create(intent="task", **{**defaults, **fields})


# --------------------------------------------------------------------------- taken


def test_switch_down_chat_is_answered_by_madre_with_both_headers(http, gw_env, upstream):
    switch_down(gw_env)
    labels = {"intent": "chat", "from_module": "switch", "to_module": "madre"}
    before = fallbacks_metric(http, **labels, reason="unavailable")
    r = http.post(
        "/vx11/route/chat",
        json={"message": "hello"},
        headers={**OP, "X-Correlation-ID": "fb-corr-1"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-module"] == "madre"
    assert r.headers["x-vx11-fallback"] == "unavailable; from=switch"
    assert r.headers["x-correlation-id"] == "fb-corr-1"
    assert paths(upstream) == [MADRE_CHAT]
    seen = upstream.seen[0]
    assert seen.method == "POST" and seen.headers["X-Correlation-ID"] == "fb-corr-1"
    assert fallbacks_metric(http, **labels, reason="unavailable") == before + 1


def test_context7_enriched_body_goes_to_the_fallback(http, gw_env, upstream):
    switch_down(gw_env)
    body = {"prompt": "play a song", "session_id": "fb-ctx", "metadata": {"lang": "es"}}
    r = http.post("/vx11/route/chat", json=body, headers=OP)
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-session"] == "fb-ctx"
    sent = upstream.seen[-1]
    assert sent.path == MADRE_CHAT
    assert sent.json()["metadata"] == {
        "lang": "es",
        "context_summary": "user: play a song",
        "topic": "audio",
    }


def test_a_5xx_falls_back_after_the_primarys_own_retries(http, gw_env, upstream):
    gw_env.set(VX11_RETRY_MAX="1")
    task_route(retry_post=True)
    upstream.respond("POST", "/switch/task", status=503, body={"busy": True})
    r = http.post("/vx11/route/task", json={"n": 1}, headers={**OP, "Idempotency-Key": "k-503"})
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-module"] == "madre"
    assert r.headers["x-vx11-fallback"] == "5xx; from=switch"
    assert paths(upstream) == ["/switch/task", "/switch/task", "/madre/task"]  # retried first
    assert r.headers["x-vx11-attempts"] == "3"  # every attempt of every option
    assert r.json()["echo"] == {"n": 1}  # the same body


def test_primary_breaker_open_is_a_circuit_open_fallback(http, upstream):
    forced = http.post("/vx11/circuit-breaker/switch", json={"action": "force_open"}, headers=OP)
    assert forced.status_code == 200, forced.text
    r = http.post("/vx11/route/code", json={"prompt": "x"}, headers=OP)
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-fallback"] == "circuit_open; from=switch"
    assert paths(upstream) == [MADRE_CHAT]


def test_a_primary_slower_than_its_share_is_a_timeout_fallback(http, upstream):
    # Two options share 1.6 s: the primary has 0.8 s for its head.
    task_route(timeout=1.6)
    upstream.respond("POST", "/switch/task", delay=3.0)
    started = time.monotonic()
    r = http.post("/vx11/route/task", json={}, headers=OP)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-fallback"] == "timeout; from=switch"
    assert 0.7 < took < 1.5, took


def test_a_429_falls_back_only_when_opted_in(http, upstream):
    upstream.respond("POST", "/switch/task", status=429, body={"slow": "down"})
    row = task_route()
    r = http.post("/vx11/route/task", json={}, headers=OP)
    assert r.status_code == 429 and r.json() == {"slow": "down"}
    assert r.headers["x-vx11-module"] == "switch" and "x-vx11-fallback" not in r.headers
    assert paths(upstream) == ["/switch/task"]

    row.fallback_on = "429"
    row.save()
    r = http.post("/vx11/route/task", json={}, headers=OP)
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-fallback"] == "429; from=switch"
    assert paths(upstream)[1:] == ["/switch/task", "/madre/task"]


def test_a_stream_falls_back_before_its_first_byte(http, upstream):
    Route.objects.create(
        intent="stream", fallbacks=[{"module": "madre", "endpoint": "/madre/stream"}]
    )
    upstream.respond("POST", "/switch/task", status=502, body={"bad": "gateway"})
    r = http.post("/vx11/route/stream", json={}, headers=OP)
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-module"] == "madre"
    assert r.headers["x-vx11-fallback"] == "5xx; from=switch"


# --------------------------------------------------------------------------- not taken


@pytest.mark.parametrize("status", [400, 404])
def test_a_4xx_is_not_a_fallback(http, upstream, status):
    task_route()
    upstream.respond("POST", "/switch/task", status=status, body={"no": status})
    r = http.post("/vx11/route/task", json={}, headers=OP)
    assert r.status_code == status and r.json() == {"no": status}
    assert r.headers["x-vx11-module"] == "switch" and "x-vx11-fallback" not in r.headers
    assert paths(upstream) == ["/switch/task"]
    upstream.respond("POST", "/switch/task", status=500)  # the control: a 5xx is one
    assert http.post("/vx11/route/task", json={}, headers=OP).headers["x-vx11-module"] == "madre"


def test_a_stream_cut_after_its_first_chunk_is_not_replayed_elsewhere(http, upstream):
    Route.objects.create(
        intent="stream", fallbacks=[{"module": "madre", "endpoint": "/madre/stream"}]
    )

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.close()  # the module dies mid-stream
        return response

    upstream.route("POST", "/switch/task", cut)
    received = b""
    aborted = pytest.raises(httpx.HTTPError)  # an aborted body, never a complete one
    with aborted, http.stream("POST", "/vx11/route/stream", json={}, headers=OP) as r:
        assert r.status_code == 200
        assert r.headers["x-vx11-module"] == "switch"
        for chunk in r.iter_bytes():
            received += chunk
    assert received.startswith(b"data: first")
    assert paths(upstream) == ["/switch/task"]  # madre never saw the request
    upstream.respond("POST", "/switch/task", status=503)  # the control: before its head
    r = http.post("/vx11/route/stream", json={}, headers=OP)
    assert r.headers["x-vx11-fallback"] == "5xx; from=switch"


def test_the_fallback_honours_its_own_breaker(http, gw_env, upstream):
    switch_down(gw_env)
    forced = http.post("/vx11/circuit-breaker/madre", json={"action": "force_open"}, headers=OP)
    assert forced.status_code == 200, forced.text
    r = http.post("/vx11/route/chat", json={"message": "hi"}, headers=OP)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "upstream_unavailable"  # the primary's error, not madre's
    assert "x-vx11-fallback" not in r.headers
    assert paths(upstream) == []
    http.post("/vx11/circuit-breaker/madre", json={"action": "reset"}, headers=OP)
    r = http.post("/vx11/route/chat", json={"message": "hi"}, headers=OP)
    assert r.status_code == 200 and r.headers["x-vx11-module"] == "madre"


def test_every_option_failed_gives_the_primarys_error(http, upstream):
    task_route()
    upstream.respond("POST", "/switch/task", status=503, body={"switch": "overloaded"})
    upstream.respond("POST", "/madre/task", status=500, body={"madre": "broken"})
    r = http.post("/vx11/route/task", json={}, headers=OP)
    assert r.status_code == 503 and r.json() == {"switch": "overloaded"}
    assert r.headers["x-vx11-module"] == "switch" and "x-vx11-fallback" not in r.headers
    assert paths(upstream) == ["/switch/task", "/madre/task"]


def test_every_option_failed_names_the_primarys_target_too(http, gw_env, upstream):
    # X-VX11-Module said switch but X-VX11-Target named madre's host:port (review finding).
    primary = UpstreamServer().start()
    try:
        primary.respond("POST", "/switch/task", status=503, body={"switch": "overloaded"})
        gw_env.set(VX11_MODULE_SWITCH_URL=primary.url)
        task_route()
        upstream.respond("POST", "/madre/task", status=500, body={"madre": "broken"})
        r = http.post("/vx11/route/task", json={}, headers=OP)
        assert r.status_code == 503 and r.headers["x-vx11-module"] == "switch"
        assert r.headers["x-vx11-target"] == f"127.0.0.1:{primary.port}"
        assert paths(upstream) == ["/madre/task"]
    finally:
        primary.stop()


def test_an_empty_list_turns_the_code_fallback_off(http, gw_env, upstream):
    switch_down(gw_env)
    assert http.post("/vx11/route/chat", json={}, headers=OP).headers["x-vx11-module"] == "madre"
    Route.objects.create(intent="chat", fallbacks=[])
    r = http.post("/vx11/route/chat", json={"message": "hi"}, headers=OP)
    assert r.status_code == 503 and r.json()["error"] == "upstream_unavailable"
    assert paths(upstream) == [MADRE_CHAT]  # the first call's


# --------------------------------------------------------------------------- configuration


def test_the_route_table_shows_and_edits_fallbacks(http):
    chat = http.get("/vx11/routes/chat", headers=OP).json()
    assert chat["fallbacks"] == [{"module": "madre", "endpoint": "/madre/chat", "method": "POST"}]
    assert chat["fallback_on"] == ""
    r = http.patch(
        "/vx11/routes/task",
        json={
            "fallbacks": [{"module": "madre", "endpoint": "/madre/task", "method": "put"}],
            "fallback_on": "5xx, 429",
        },
        headers=OP,
    )
    assert r.status_code == 201, r.text  # the override was created
    assert r.json()["fallbacks"] == [
        {"module": "madre", "endpoint": "/madre/task", "method": "PUT"}
    ]
    assert r.json()["fallback_on"] == "5xx,429"
    assert CODE_ROUTES["task"].fallbacks == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"fallbacks": [{"module": "nosuch", "endpoint": "/x"}]}, "unknown module 'nosuch'"),
        ({"fallbacks": [{"module": "switch", "endpoint": "/x"}]}, "repeats the route's own"),
        ({"fallbacks": [{"module": m, "endpoint": "/x"} for m in FOUR]}, "At most 3 fallbacks"),
        ({"fallbacks": [{"module": "madre", "endpoint": "x"}]}, "must start with a single '/'"),
        ({"fallbacks": [{"module": "madre"}]}, "needs an endpoint"),
        ({"fallbacks": {"module": "madre"}}, "must be a list"),
        ({"fallback_on": "5xx,4xx"}, "Unknown trigger(s) '4xx'"),
    ],
)
def test_invalid_fallbacks_are_refused_by_the_api(http, body, message):
    r = http.patch("/vx11/routes/task", json=body, headers=OP)
    assert r.status_code == 400, r.text
    assert message in r.text
    assert not Route.objects.filter(intent="task").exists()


def test_a_module_change_is_checked_against_the_stored_fallbacks(http):
    task_route()
    r = http.patch("/vx11/routes/task", json={"module": "madre"}, headers=OP)
    assert r.status_code == 400 and "repeats the route's own module 'madre'" in r.text


def test_invalid_fallbacks_are_refused_by_the_config_import(transactional_db: None):
    doc = {
        "routes": {
            "task": {"fallbacks": [{"module": "nosuch", "endpoint": "/x"}]},
            "code": {"fallbacks": [{"module": "switch", "endpoint": "/x"}]},
            "audio": {"fallback_on": "sometimes"},
            "spawn": {"fallbacks": [{"module": "madre", "endpoint": "/m"}] * 4},
        }
    }
    with pytest.raises(DocumentError) as caught:
        import_document(doc)
    joined = "\n".join(caught.value.errors)
    assert "routes.task.fallbacks: Fallback 1: unknown module 'nosuch'" in joined
    assert "routes.code.fallbacks: Fallback 1 repeats the route's own module 'switch'" in joined
    assert "routes.audio.fallback_on: Unknown trigger(s) 'sometimes'" in joined
    assert "routes.spawn.fallbacks: At most 3 fallbacks" in joined
    assert not Route.objects.exists()


def test_the_config_import_accepts_a_fallback_to_a_module_of_the_same_document(
    transactional_db: None,
):
    outcome = import_document(
        {
            "modules": {"billing": {"url": "http://10.1.1.1:9000"}},
            "routes": {
                "task": {
                    "fallbacks": [{"module": "billing", "endpoint": "/bill", "method": "post"}],
                    "fallback_on": "timeout,unavailable",
                }
            },
        }
    )
    assert [str(c) for c in outcome.changes] == ["added module billing", "added route task"]
    row = Route.objects.get(intent="task")
    assert row.fallbacks == [{"module": "billing", "endpoint": "/bill", "method": "POST"}]
    assert row.fallback_on == "unavailable,timeout"


def test_the_admin_form_edits_fallbacks_and_says_what_is_wrong(admin_client):
    form = {"intent": "task", "enabled": "on", "fallback_on": "", "fallbacks": ""}
    page = admin_client.get("/admin/gateway/route/add/").content.decode()
    assert 'name="fallbacks"' in page and "tried in order" in page
    bad = {**form, "fallbacks": '[{"module": "switch", "endpoint": "/s"}]', "fallback_on": "4xx"}
    r = admin_client.post("/admin/gateway/route/add/", bad)
    assert r.status_code == 200  # the form again, with its errors
    text = r.content.decode()
    assert "repeats the route&#x27;s own module &#x27;switch&#x27;" in text
    assert "Unknown trigger(s) &#x27;4xx&#x27;" in text
    assert not Route.objects.exists()
    good = {**form, "fallbacks": '[{"module": "madre", "endpoint": "/m", "method": "get"}]'}
    r = admin_client.post("/admin/gateway/route/add/", good)
    assert r.status_code == 302, r.content[:2000]
    assert Route.objects.get(intent="task").fallbacks == [
        {"module": "madre", "endpoint": "/m", "method": "GET"}
    ]
    listing = admin_client.get("/admin/gateway/route/").content.decode()
    assert "madre <code>/m</code>" in listing  # the effective table's column


def test_the_dashboard_shows_the_chains_and_how_often_they_were_taken(http, gw_env, admin_client):
    switch_down(gw_env)
    page = admin_client.get("/admin/dashboard/").content.decode()
    assert "<b>chat</b> → switch, falls back to" in page
    before = int(page.split('data-fallback="madre">madre (')[1].split(" ")[0])
    assert http.post("/vx11/route/chat", json={}, headers=OP).status_code == 200
    page = admin_client.get("/admin/dashboard/").content.decode()
    assert f'<span data-fallback="madre">madre ({before + 1} taken)</span>' in page


# --------------------------------------------------------------------------- snapshot


def test_the_snapshot_parses_stored_chains_once_and_skips_what_is_invalid(transactional_db):
    from gateway.config.fallbacks import Fallback
    from gateway.config.snapshot import load_snapshot

    Route.objects.create(intent="task")
    Route.objects.filter(intent="task").update(  # as raw SQL could: never validated
        fallbacks=[
            {"module": "madre", "endpoint": "/madre/t☃"},
            {"module": "switch", "endpoint": "/again"},  # the primary
            {"module": "hermes", "endpoint": "/h"},
            "nonsense",  # and a fourth
        ]
    )
    Route.objects.create(intent="code", module="madre")  # its inherited fallback is madre
    routes = load_snapshot(0).routes
    assert routes["task"].fallbacks == (
        Fallback("madre", "/madre/t%E2%98%83"),
        Fallback("hermes", "/h"),
    )
    assert routes["code"].fallbacks == ()
    assert routes["chat"].fallbacks == (Fallback("madre", "/madre/chat", "POST"),)


async def test_the_demo_madre_answers_chat():
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.demo import build_app

    async with TestClient(TestServer(build_app("madre"))) as client:
        r = await client.post("/madre/chat", json={"message": "hi"})
        assert r.status == 200 and (await r.json())["response"] == "madre heard: hi"


async def test_a_full_bulkhead_is_an_overloaded_fallback(gateway, gw_env, upstream):
    from asgiref.sync import sync_to_async

    gw_env.set(VX11_MODULE_SWITCH_MAX_CONCURRENT="1", VX11_MODULE_QUEUE_MAX="0")
    await sync_to_async(task_route)()
    upstream.respond("POST", "/switch/slow", delay=1.0)
    await sync_to_async(Route.objects.create)(
        intent="slow", module="switch", endpoint="/switch/slow"
    )
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        holder = asyncio.create_task(client.post("/vx11/route/slow", json={}, headers=OP))
        for _ in range(100):  # until the slow call holds switch's only slot
            if "/switch/slow" in paths(upstream):
                break
            await asyncio.sleep(0.02)
        r = await client.post("/vx11/route/task", json={}, headers=OP)
        assert (await holder).status_code == 200
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-fallback"] == "overloaded; from=switch"
    assert r.headers["x-vx11-module"] == "madre"


def test_a_streamed_upload_falls_back_only_before_it_was_sent(http, gw_env, upstream):
    """A chunked body cannot be sent twice: a breaker refusal (nothing sent) still falls
    back, a connect failure (the body may have gone) gives the primary's error."""
    task_route()

    def chunks():  # two ASGI messages: the gateway streams it on, it cannot buffer it
        yield b'{"part": '
        time.sleep(0.2)
        yield b"1}"

    switch_down(gw_env)
    r = http.post("/vx11/route/task", content=chunks(), headers=OP)
    assert r.status_code == 503 and r.json()["error"] == "upstream_unavailable"
    assert paths(upstream) == []
    http.post("/vx11/circuit-breaker/switch", json={"action": "force_open"}, headers=OP)
    r = http.post("/vx11/route/task", content=chunks(), headers=OP)
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-fallback"] == "circuit_open; from=switch"
    assert upstream.seen[-1].body == b'{"part": 1}'


def test_export_then_import_of_a_chain_is_a_no_op(transactional_db: None):
    from gateway.config.versioning import ConfigVersion
    from gateway.operations.config_doc import build_document, dump, parse

    import_document(
        {
            "routes": {
                "task": {
                    "fallbacks": [{"module": "madre", "endpoint": "/madre/task", "method": "put"}],
                    "fallback_on": "429, 5xx",
                },
                "chat": {"fallbacks": []},
            }
        }
    )
    doc = build_document()
    assert doc["routes"]["task"] == {
        "fallbacks": [{"module": "madre", "endpoint": "/madre/task", "method": "PUT"}],
        "fallback_on": "5xx,429",
    }
    assert doc["routes"]["chat"] == {"fallbacks": []}
    before = ConfigVersion.read()
    outcome = import_document(parse(dump(doc)))
    assert outcome.changes == [] and ConfigVersion.read() == before


# --------------------------------------------------------------------------- deadline shares


def slow_body(pause: float, status: int = 200):
    """A sized JSON answer whose head comes at once and whose body ends ``pause`` later."""
    first, rest = b'{"slow": ', b"true}"

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        response.content_length = len(first) + len(rest)
        await response.prepare(request)
        await response.write(first)
        await asyncio.sleep(pause)
        await response.write(rest)
        await response.write_eof()
        return response

    return handler


def test_the_share_bounds_the_head_and_the_chosen_body_may_use_the_whole_timeout(http, upstream):
    """Two options share 1.6 s: the primary's head is in at once, its body ends at ≈ 1.1 s,
    past its 0.8 s share but within the route's timeout: it answers, nothing falls back."""
    task_route(timeout=1.6)
    upstream.route("POST", "/switch/task", slow_body(1.1))
    r = http.post("/vx11/route/task", json={}, headers=OP)
    assert r.status_code == 200, r.text
    assert r.json() == {"slow": True}
    assert r.headers["x-vx11-module"] == "switch" and "x-vx11-fallback" not in r.headers
    assert paths(upstream) == ["/switch/task"]


def test_the_chosen_body_is_still_bounded_by_the_routes_timeout(http, upstream):
    task_route(timeout=1.6)
    upstream.route("POST", "/switch/task", slow_body(3.0))
    started = time.monotonic()
    r = http.post("/vx11/route/task", json={}, headers=OP)
    took = time.monotonic() - started
    assert r.status_code == 504 and r.json()["error"] == "upstream_timeout", r.text
    assert took > 1.4, took  # not cut at its 0.8 s share (a lower bound: load cannot break it)
    assert paths(upstream) == ["/switch/task"]  # its head was in: never replayed elsewhere


@pytest.mark.parametrize("intent", ["task", "stream"])
def test_a_failure_head_whose_body_stalls_falls_back_within_its_share(http, upstream, intent):
    """A 503 head, then silence: its body's read is bounded (the option's share), and the
    fallback answers; before, a streaming route (head only) waited for it without end."""
    fallback = {"module": "madre", "endpoint": f"/madre/{intent}"}
    Route.objects.create(intent=intent, timeout=1.6, fallbacks=[fallback])
    upstream.route("POST", "/switch/task", slow_body(3.0, status=503))
    started = time.monotonic()
    r = http.post(f"/vx11/route/{intent}", json={}, headers=OP)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-module"] == "madre"
    assert r.headers["x-vx11-fallback"] == "5xx; from=switch"
    assert took < 1.5, took


def test_a_fallback_failing_with_no_trigger_is_logged(http, upstream, caplog):
    task_route(fallback_on="5xx")
    upstream.respond("POST", "/switch/task", status=503, body={"switch": "busy"})
    forced = http.post("/vx11/circuit-breaker/madre", json={"action": "force_open"}, headers=OP)
    assert forced.status_code == 200, forced.text
    with caplog.at_level("WARNING", logger="gateway.proxy"):
        r = http.post("/vx11/route/task", json={}, headers=OP)
    assert r.status_code == 503 and r.json() == {"switch": "busy"}  # the primary's answer
    ended = [rec for rec in caplog.records if rec.name == "gateway.proxy" and "fallback" in rec.msg]
    assert len(ended) == 1, caplog.records
    assert ended[0].getMessage() == (
        "fallback madre failed (circuit_open): not one of the route's triggers"
    )
    assert ended[0].__dict__["error"] == "circuit_open"
