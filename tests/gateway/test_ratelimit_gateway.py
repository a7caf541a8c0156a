"""Rate limits through the live gateway (SPEC §8): scopes, headers, overrides, outages."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time

import httpx
import pytest

from tests.conftest import GATEWAY_TOKEN, OPERATOR_TOKEN
from tests.servers import GatewayProcess, fresh_database_url

OP = {"X-VX11-Token": OPERATOR_TOKEN}
GW = {"X-VX11-GW-Token": GATEWAY_TOKEN}
RATELIMIT_RE = re.compile(r'^"(token|ip|protected)";r=(\d+);t=(\d+)$')


def task(http: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post("/vx11/route/task", json={}, headers=OP if headers is None else headers)


def rejections(http: httpx.Client, scope: str) -> float:
    """``rate_limit_rejections_total{scope=...}`` as /metrics shows it now."""
    text = http.get("/metrics").text
    match = re.search(
        rf'^rate_limit_rejections_total\{{scope="{scope}"\}} (\S+)$', text, re.MULTILINE
    )
    return float(match.group(1)) if match else 0.0


# --------------------------------------------------------------------------- accuracy


async def test_exactly_the_limit_is_admitted_out_of_three_times_as_many(gateway, upstream, gw_env):
    gw_env.set(VX11_RATE_LIMIT_TOKEN=10)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as client:
        answers = await asyncio.gather(
            *(client.post("/vx11/route/task", json={}, headers=OP) for _ in range(30))
        )
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 10 + [429] * 20
    assert {r.json()["scope"] for r in answers if r.status_code == 429} == {"token"}
    assert len(upstream.seen) == 10


@pytest.fixture
def two_gateways(redis_url, upstream):
    workdir = tempfile.mkdtemp(prefix="vx11-rl-")
    env = {
        "DATABASE_URL": fresh_database_url(os.environ.get("DATABASE_URL"), workdir),
        "VX11_REDIS_URL": redis_url,
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_VAR_DIR": workdir,
        "VX11_MODULE_SWITCH_URL": upstream.url,
        "VX11_RATE_LIMIT_TOKEN": "10",
    }
    GatewayProcess.migrate(env)
    a, b = GatewayProcess(env).start(), GatewayProcess(env).start()
    yield a, b
    a.stop()
    b.stop()


@pytest.mark.reliability
async def test_the_limit_is_global_across_two_processes_sharing_redis(two_gateways, upstream):
    a, b = two_gateways
    async with httpx.AsyncClient(timeout=20) as client:
        answers = await asyncio.gather(
            *(
                client.post((a if i % 2 else b).url + "/vx11/route/task", json={}, headers=OP)
                for i in range(30)
            )
        )
        status = (await client.get(a.url + "/vx11/rate-limit/status", headers=OP)).json()
    assert sorted(r.status_code for r in answers) == [200] * 10 + [429] * 20
    assert len(upstream.seen) == 10
    token = next(s for s in status["scopes"] if s["scope"] == "token")
    assert (token["limit"], token["remaining"]) == (10, 0)
    assert status["degraded"] is False


# --------------------------------------------------------------------------- scopes


def test_token_scope_refuses_with_its_name(http, gw_env):
    gw_env.set(VX11_RATE_LIMIT_TOKEN=2)
    assert [task(http).status_code for _ in range(2)] == [200, 200]
    r = task(http)
    assert r.status_code == 429
    body = r.json()
    assert body["error"] == "too_many_requests" and body["scope"] == "token"
    assert body["status"] == 429 and body["retry_after"] >= 1
    assert r.headers["content-type"] == "application/problem+json"


def test_ip_scope_refuses_with_its_name(http, gw_env, make_client):
    gw_env.set(VX11_RATE_LIMIT_IP=3)
    _, token = make_client("second")
    assert task(http).status_code == 200
    assert task(http, {"X-VX11-Token": token}).status_code == 200
    assert http.get("/shub/health").status_code == 200  # anonymous: the IP scope alone
    r = task(http, {"X-VX11-Token": token})
    assert r.status_code == 429 and r.json()["scope"] == "ip"
    assert http.get("/shub/ready").json()["scope"] == "ip"


def test_protected_scope_covers_protected_routes_only(http, upstream, gw_env):
    gw_env.set(VX11_RATE_LIMIT_PROTECTED=2)
    audio = [http.post("/vx11/route/audio", json={}, headers=OP) for _ in range(3)]
    assert [r.status_code for r in audio] == [200, 200, 429]
    assert audio[2].json()["scope"] == "protected"
    assert "q=2;w=60" in audio[0].headers["ratelimit-policy"]
    # An unprotected route is not counted against the protected scope.
    assert task(http).status_code == 200
    assert '"protected"' not in task(http).headers["ratelimit-policy"]


def test_protected_scope_covers_protected_shub_paths(http, upstream, gw_env):
    gw_env.set(VX11_RATE_LIMIT_PROTECTED=2)
    answers = [http.get("/shub/files/1", headers=GW) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[2].json()["scope"] == "protected"
    # Public /shub paths are not protected.
    assert http.get("/shub/health").status_code == 200
    assert len([s for s in upstream.seen if s.path == "/files/1"]) == 2


def test_client_token_names_the_caller_on_protected_shub_paths(http, gw_env, make_client):
    gw_env.set(VX11_RATE_LIMIT_PROTECTED=2)
    _, first = make_client("shub-a")
    _, second = make_client("shub-b")
    as_first = {**GW, "X-VX11-Token": first}
    answers = [http.get("/shub/files/1", headers=as_first) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[2].json()["scope"] == "protected"
    # Another client, and the gateway token alone, have counters of their own.
    assert http.get("/shub/files/1", headers={**GW, "X-VX11-Token": second}).status_code == 200
    assert http.get("/shub/files/1", headers=GW).status_code == 200


def test_per_client_override_replaces_the_default(http, gw_env, make_client):
    gw_env.set(VX11_RATE_LIMIT_TOKEN=100)
    _, limited = make_client("limited", rate_limit=3)
    _, default = make_client("default")
    answers = [task(http, {"X-VX11-Token": limited}) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit"] == "3"
    assert answers[3].json()["scope"] == "token"
    r = task(http, {"X-VX11-Token": default})
    assert r.status_code == 200 and r.headers["x-ratelimit-limit"] == "100"


def test_per_client_protected_override(http, gw_env, make_client):
    gw_env.set(VX11_RATE_LIMIT_PROTECTED=100)
    _, token = make_client("audio-bot", protected_rate_limit=1)
    first = http.post("/vx11/route/audio", json={}, headers={"X-VX11-Token": token})
    second = http.post("/vx11/route/audio", json={}, headers={"X-VX11-Token": token})
    assert (first.status_code, second.status_code) == (200, 429)
    assert second.json()["scope"] == "protected"


def test_operator_tokens_are_limited_like_any_client(http, gw_env):
    gw_env.set(VX11_RATE_LIMIT_TOKEN=1)
    bearer = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    assert task(http, bearer).status_code == 200
    r = task(http)  # the same operator through the other header: the same counter
    assert r.status_code == 429 and r.json()["scope"] == "token"


# --------------------------------------------------------------------------- headers


def test_admitted_answers_carry_the_rate_limit_headers(http, gw_env):
    gw_env.set(VX11_RATE_LIMIT_TOKEN=3, VX11_RATE_LIMIT_WINDOW=30)
    first, second = task(http), task(http)
    assert first.headers["ratelimit-policy"] == '"token";q=3;w=30, "ip";q=5000;w=30'
    assert first.headers["x-ratelimit-limit"] == "3"
    assert (first.headers["x-ratelimit-remaining"], second.headers["x-ratelimit-remaining"]) == (
        "2",
        "1",
    )
    match = RATELIMIT_RE.match(second.headers["ratelimit"])
    assert match and match.group(1) == "token" and match.group(2) == "1"
    assert 0 < int(match.group(3)) <= 30
    assert 0 < int(second.headers["x-ratelimit-reset"]) <= 30
    assert "retry-after" not in first.headers


def test_refusal_carries_retry_after_and_every_rate_limit_header(http, gw_env):
    gw_env.set(VX11_RATE_LIMIT_TOKEN=1, VX11_RATE_LIMIT_WINDOW=20)
    task(http)
    r = task(http)
    assert r.status_code == 429
    retry_after = int(r.headers["retry-after"])
    assert 20 >= retry_after >= 1
    assert r.json()["retry_after"] == retry_after
    assert r.headers["ratelimit-policy"].startswith('"token";q=1;w=20')
    match = RATELIMIT_RE.match(r.headers["ratelimit"])
    assert match and match.groups()[:2] == ("token", "0")
    assert r.headers["x-ratelimit-limit"] == "1"
    assert r.headers["x-ratelimit-remaining"] == "0"
    assert 20 >= int(r.headers["x-ratelimit-reset"]) >= 1
    assert r.headers["x-correlation-id"] == r.json()["correlation_id"]


# --------------------------------------------------------------------------- modes


def test_shadow_mode_counts_but_never_refuses(http, upstream, gw_env):
    gw_env.set(VX11_RATE_LIMIT_TOKEN=2, VX11_RATE_LIMIT_ENFORCE="false")
    before = rejections(http, "token")
    answers = [task(http) for _ in range(5)]
    assert [r.status_code for r in answers] == [200] * 5
    assert [r.headers["x-ratelimit-remaining"] for r in answers] == ["1", "0", "0", "0", "0"]
    assert all("ratelimit-policy" in r.headers for r in answers)
    assert rejections(http, "token") == before + 3
    assert len(upstream.seen) == 5


def test_disabled_rate_limits_neither_refuse_nor_send_headers(http, gw_env):
    gw_env.set(VX11_RATE_LIMIT_TOKEN=1, VX11_RATE_LIMIT_IP=1, VX11_RATE_LIMIT_ENABLED="false")
    answers = [task(http) for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    assert not any("ratelimit" in r.headers or "x-ratelimit-limit" in r.headers for r in answers)


def test_health_ready_and_metrics_are_exempt(http, gw_env):
    gw_env.set(VX11_RATE_LIMIT_IP=1)
    assert task(http).status_code == 200
    assert task(http).status_code == 429
    for path in ("/health", "/ready", "/metrics"):
        for _ in range(3):
            r = http.get(path)
            assert r.status_code == 200, (path, r.text)
            assert "x-ratelimit-limit" not in r.headers


def test_a_redis_outage_falls_back_to_local_limits_without_stalling(
    http, upstream, gw_env, own_redis
):
    gw_env.set(VX11_REDIS_URL=own_redis.url, VX11_RATE_LIMIT_TOKEN=5)
    assert [task(http).status_code for _ in range(2)] == [200, 200]
    own_redis.stop()
    started = time.monotonic()
    answers = [task(http) for _ in range(20)]
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in answers]
    # The per-process fallback starts counting afresh: 5 admitted, the rest refused.
    assert statuses.count(200) == 5 and statuses.count(429) == 15, statuses
    assert elapsed < 2.0, f"20 requests took {elapsed:.2f} s during the outage"
    status = http.get("/vx11/rate-limit/status", headers=OP).json()
    assert status["degraded"] is True


def test_fail_mode_open_admits_everything_during_an_outage(http, gw_env, own_redis):
    gw_env.set(
        VX11_REDIS_URL=own_redis.url, VX11_RATE_LIMIT_TOKEN=2, VX11_RATE_LIMIT_FAIL_MODE="open"
    )
    own_redis.stop()
    assert [task(http).status_code for _ in range(5)] == [200] * 5


def test_fail_mode_closed_refuses_during_an_outage(http, gw_env, own_redis):
    gw_env.set(
        VX11_REDIS_URL=own_redis.url, VX11_RATE_LIMIT_TOKEN=100, VX11_RATE_LIMIT_FAIL_MODE="closed"
    )
    own_redis.stop()
    r = task(http)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


# --------------------------------------------------------------------------- status endpoint


def test_status_needs_a_token(http):
    r = http.get("/vx11/rate-limit/status")
    assert r.status_code == 401 and r.json()["error"] == "auth_required"
    r = http.get("/vx11/rate-limit/status", headers={"X-VX11-Token": "wrong"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


def test_status_shows_usage_per_scope_without_consuming(http, gw_env, make_client):
    gw_env.set(VX11_RATE_LIMIT_TOKEN=5, VX11_RATE_LIMIT_PROTECTED=4, VX11_RATE_LIMIT_WINDOW=30)
    _, token = make_client("reader")
    headers = {"X-VX11-Token": token}
    task(http, headers)
    task(http, headers)
    http.post("/vx11/route/audio", json={}, headers=headers)
    first = http.get("/vx11/rate-limit/status", headers=headers)
    second = http.get("/vx11/rate-limit/status", headers=headers)
    assert first.status_code == 200
    assert first.json() == second.json()  # reading the status costs nothing
    body = first.json()
    assert body["enforced"] is True and body["degraded"] is False
    scopes = {s["scope"]: s for s in body["scopes"]}
    assert set(scopes) == {"token", "ip", "protected"}
    assert {k: scopes["token"][k] for k in ("limit", "remaining", "window")} == {
        "limit": 5,
        "remaining": 2,
        "window": 30,
    }
    assert (scopes["protected"]["limit"], scopes["protected"]["remaining"]) == (4, 3)
    assert (scopes["ip"]["limit"], scopes["ip"]["remaining"]) == (5000, 4997)
    assert 0 < scopes["token"]["reset"] <= 30
    # Then the proxy still admits exactly what the status promised.
    assert [task(http, headers).status_code for _ in range(3)] == [200, 200, 429]


def test_status_shows_the_client_override(http, make_client):
    _, token = make_client("tiny", rate_limit=7)
    body = http.get("/vx11/rate-limit/status", headers={"X-VX11-Token": token}).json()
    token_scope = next(s for s in body["scopes"] if s["scope"] == "token")
    assert token_scope == {"scope": "token", "limit": 7, "remaining": 7, "reset": 0, "window": 60}


def test_status_in_shadow_mode_and_when_disabled(http, gw_env):
    gw_env.set(VX11_RATE_LIMIT_ENFORCE="false")
    body = http.get("/vx11/rate-limit/status", headers=OP).json()
    assert body["enforced"] is False and body["scopes"]
    gw_env.set(VX11_RATE_LIMIT_ENABLED="false")
    body = http.get("/vx11/rate-limit/status", headers=OP).json()
    assert body == {"enabled": False, "enforced": False, "degraded": False, "scopes": []}


def test_status_is_read_only(http):
    r = http.post("/vx11/rate-limit/status", headers=OP)
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
