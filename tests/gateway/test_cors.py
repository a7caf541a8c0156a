"""CORS (SPEC §22, issue #17 item 2): one set of rules on the proxy paths and the Django side.

Three real gateway processes (``uvicorn``, the production stack) share one database and one
real upstream: ``cors`` allows two origins, ``creds`` also sends
``Access-Control-Allow-Credentials``, ``plain`` has no CORS configuration. The same cases
run against a proxy path (``/vx11/route/task``, served by ``gateway.edge``) and a
management path (``/vx11/routes``, served by Django).
"""

from __future__ import annotations

import json
import pathlib
import re
import tempfile
from collections.abc import Iterator

import httpx
import pytest

from gateway.core import cors
from tests.conftest import GATEWAY_TOKEN, MODULE_NAMES, OPERATOR_TOKEN
from tests.servers import GatewayProcess, UpstreamServer, fresh_database_url
from vx11site.env import EnvError

APP = "https://app.example"
OTHER = "https://evil.example"
OP = {"X-VX11-Token": OPERATOR_TOKEN}
#: (path, method) of the two kinds of path: the lean proxy and Django's management API.
PATHS = {"proxy": ("/vx11/route/task", "POST"), "management": ("/vx11/routes", "GET")}


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer().start()
    # A module that sends CORS headers of its own (the gateway's override them).
    server.respond(
        "GET",
        "/openapi.json",
        body={"openapi": "3.1.0"},
        headers={
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": "X-Secret",
            "Vary": "Accept-Encoding",
        },
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateways(upstream: UpstreamServer) -> Iterator[dict[str, GatewayProcess]]:
    workdir = tempfile.mkdtemp(prefix="vx11-cors-")
    env = {
        "DATABASE_URL": fresh_database_url(None, workdir),
        "VX11_VAR_DIR": workdir,
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "VX11_REDIS_URL": "",
        "VX11_RATE_LIMIT_PROTECTED": "1",
        **{f"VX11_MODULE_{name.upper()}_URL": upstream.url for name in MODULE_NAMES},
    }
    GatewayProcess.migrate(env)
    allowed = f"{APP}/, http://localhost:3000"  # a trailing slash is dropped
    started: dict[str, GatewayProcess] = {}
    try:
        for name, extra in {
            "cors": {"VX11_CORS_ALLOWED_ORIGINS": allowed},
            "creds": {"VX11_CORS_ALLOWED_ORIGINS": allowed, "VX11_CORS_ALLOW_CREDENTIALS": "true"},
            "plain": {},
        }.items():
            started[name] = GatewayProcess({**env, **extra}).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def call(
    gateway: GatewayProcess, method: str, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = b"{}" if method == "POST" else None
    return httpx.request(method, gateway.url + path, headers=headers, content=body, timeout=10)


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def vary(response: httpx.Response) -> list[str]:
    return [part.strip().lower() for part in response.headers.get("vary", "").split(",")]


def preflight_headers(origin: str, method: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "x-vx11-token, content-type",
    }


# --------------------------------------------------------------------------- preflights


@pytest.mark.parametrize("kind", PATHS)
def test_a_preflight_from_an_allowed_origin_is_answered_by_the_gateway(gateways, upstream, kind):
    path, method = PATHS[kind]
    seen = len(upstream.seen)
    r = call(gateways["cors"], "OPTIONS", path, preflight_headers(APP, method))  # no token
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert r.headers["access-control-allow-origin"] == APP
    methods = {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "PUT", "PATCH", "DELETE"} <= methods
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"x-vx11-token", "authorization", "content-type", "x-vx11-session"} <= allowed
    assert r.headers["access-control-max-age"] == str(cors.MAX_AGE)
    assert "access-control-allow-credentials" not in r.headers
    assert "origin" in vary(r)
    assert r.headers["x-correlation-id"]
    assert len(upstream.seen) == seen  # never forwarded


def test_the_second_allowed_origin_and_a_shub_path_are_preflighted_too(gateways, upstream):
    seen = len(upstream.seen)
    r = call(
        gateways["cors"],
        "OPTIONS",
        "/shub/files/1",
        preflight_headers("http://localhost:3000", "GET"),
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert len(upstream.seen) == seen


@pytest.mark.parametrize("kind", PATHS)
def test_a_preflight_from_another_origin_is_served_as_any_request(gateways, upstream, kind):
    path, method = PATHS[kind]
    seen = len(upstream.seen)
    r = call(gateways["cors"], "OPTIONS", path, preflight_headers(OTHER, method))
    today = call(gateways["plain"], "OPTIONS", path, preflight_headers(OTHER, method))
    assert r.status_code == today.status_code != 204
    assert cors_headers(r) == {}
    assert len(upstream.seen) == seen


@pytest.mark.parametrize("kind", PATHS)
def test_without_configuration_there_are_no_cors_headers_at_all(gateways, kind):
    path, method = PATHS[kind]
    plain = gateways["plain"]
    asked = call(plain, "OPTIONS", path, preflight_headers(APP, method))
    assert asked.status_code == call(plain, "OPTIONS", path).status_code  # as without CORS
    for r in (
        asked,
        call(plain, method, path, OP | {"Origin": APP}),
        call(plain, method, path, {"Origin": APP}),  # a problem answer
    ):
        assert cors_headers(r) == {}, r.headers
        assert "origin" not in vary(r)
    # The lean proxy writes no access log without VX11_ACCESS_LOG.
    assert '"total_ms"' not in plain.output()


# --------------------------------------------------------------------------- actual answers


@pytest.mark.parametrize("kind", PATHS)
def test_answers_to_an_allowed_origin_carry_cors_headers(gateways, kind):
    path, method = PATHS[kind]
    r = call(gateways["cors"], method, path, OP | {"Origin": APP})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == APP
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"x-correlation-id", "ratelimit", "ratelimit-policy", "retry-after"} <= exposed
    assert {"x-vx11-intent", "x-vx11-module", "x-vx11-session", "x-vx11-attempts"} <= exposed
    assert "access-control-allow-credentials" not in r.headers
    assert "origin" in vary(r)


@pytest.mark.parametrize("kind", PATHS)
def test_problem_answers_carry_cors_headers(gateways, kind):
    path, method = PATHS[kind]
    r = call(gateways["cors"], method, path, {"Origin": APP})  # no token
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["access-control-allow-origin"] == APP
    assert "retry-after" in r.headers["access-control-expose-headers"].lower()
    assert "origin" in vary(r)


@pytest.mark.parametrize("kind", PATHS)
def test_other_origins_get_no_cors_headers(gateways, kind):
    path, method = PATHS[kind]
    for headers in (OP | {"Origin": OTHER}, OP, {"Origin": OTHER}):
        r = call(gateways["cors"], method, path, headers)
        assert cors_headers(r) == {}, r.headers
        assert "origin" in vary(r)  # the answer still depends on the origin (caches)


@pytest.mark.parametrize("kind", PATHS)
def test_the_credentials_flag(gateways, kind):
    path, method = PATHS[kind]
    creds = gateways["creds"]
    r = call(creds, "OPTIONS", path, preflight_headers(APP, method))
    assert r.status_code == 204
    assert r.headers["access-control-allow-credentials"] == "true"
    r = call(creds, method, path, OP | {"Origin": APP})
    assert r.headers["access-control-allow-origin"] == APP
    assert r.headers["access-control-allow-credentials"] == "true"
    r = call(creds, method, path, OP | {"Origin": OTHER})
    assert cors_headers(r) == {}


def test_refusals_cached_and_streamed_answers_carry_cors_headers(gateways):
    gateway = gateways["cors"]
    origin = {"Origin": APP}
    statuses = [call(gateway, "POST", "/vx11/route/audio", OP | origin) for _ in range(3)]
    refused = [r for r in statuses if r.status_code == 429]
    assert refused, [r.status_code for r in statuses]
    assert refused[0].headers["access-control-allow-origin"] == APP
    assert refused[0].headers["retry-after"]
    cached = [call(gateway, "GET", "/shub/health", origin) for _ in range(2)]
    assert cached[1].headers["x-cache"] == "HIT"
    assert all(r.headers["access-control-allow-origin"] == APP for r in cached)
    streamed = call(gateway, "POST", "/vx11/route/stream", OP | origin)
    assert streamed.status_code == 200
    assert streamed.headers["access-control-allow-origin"] == APP
    assert json.loads(streamed.content)["path"] == "/switch/task"


def test_the_upstreams_own_cors_headers_are_replaced(gateways):
    """Kong's cors plugin overrides a service's CORS headers; so does the gateway."""
    gateway = gateways["cors"]
    r = call(gateway, "GET", "/shub/openapi.json", {"Origin": APP})
    assert r.status_code == 200 and r.json() == {"openapi": "3.1.0"}
    assert r.headers["access-control-allow-origin"] == APP
    assert "access-control-allow-credentials" not in r.headers
    assert "x-secret" not in r.headers["access-control-expose-headers"].lower()
    assert vary(r) == ["accept-encoding", "origin"]
    r = call(gateway, "GET", "/shub/openapi.json", {"Origin": OTHER})
    assert cors_headers(r) == {}
    # Unconfigured, the gateway is transparent: the module's own CORS headers pass.
    r = call(gateways["plain"], "GET", "/shub/openapi.json", {"Origin": OTHER})
    assert r.headers["access-control-allow-origin"] == "*"
    assert vary(r) == ["accept-encoding"]


# --------------------------------------------------------------------------- the rules


def test_origins_are_parsed_once_into_their_browser_form():
    assert cors.parse_origins(
        [
            "HTTPS://App.Example/",
            "http://localhost:3000",
            "https://a.example:443",
            "http://[::1]:8080",
        ]
    ) == frozenset(
        {"https://app.example", "http://localhost:3000", "https://a.example", "http://[::1]:8080"}
    )
    assert cors.parse_origins([]) == frozenset()


@pytest.mark.parametrize(
    "bad",
    [
        "*",
        "https://*.example",
        "app.example",
        "ftp://app.example",
        "https://app.example/path",
        "https://app.example?x=1",
        "https://user@app.example",
        "https://app.example:99999",
        "null",
    ],
)
def test_anything_but_an_origin_is_refused_by_name(bad):
    with pytest.raises(EnvError, match="VX11_CORS_ALLOWED_ORIGINS"):
        cors.parse_origins([bad])


def test_vary_gains_origin_once():
    assert cors.vary_with_origin(None) == "Origin"
    assert cors.vary_with_origin("Accept-Encoding") == "Accept-Encoding, Origin"
    assert cors.vary_with_origin("origin, Accept") == "origin, Accept"
    assert cors.vary_with_origin("*") == "*"


def test_a_preflight_needs_options_the_request_method_and_an_allowed_origin():
    policy = cors.policy(frozenset({APP}), False)
    assert policy.is_preflight("OPTIONS", APP, "POST")
    assert not policy.is_preflight("OPTIONS", APP, None)
    assert not policy.is_preflight("POST", APP, "POST")
    assert not policy.is_preflight("OPTIONS", OTHER, "POST")
    assert not policy.is_preflight("OPTIONS", None, "POST")
    assert not policy.is_preflight("OPTIONS", APP.upper(), "POST")  # exact, as browsers send


# --------------------------------------------------------------------------- the rules alone


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.evil",  # the allowed origin as a prefix
        "https://evil-app.example",  # as a suffix
        "https://sub.app.example",
        "https://app.example:8443",  # another port
        "http://app.example",  # another scheme
        "null",  # sandboxed iframes, file: pages, redirects
        "",
        "https://APP.example.",
    ],
)
def test_only_the_exact_origin_is_allowed(origin: str) -> None:
    rules = cors.policy(cors.parse_origins([APP]), False)
    assert rules.allows(APP)  # browsers send the origin serialised: no default port
    assert not rules.allows(origin)
    assert rules.answer_headers(origin) == []


def test_every_gateway_request_header_is_allowed_and_every_answer_header_exposed() -> None:
    # The gateway's own headers, as the edge reads or writes them (a new one must be listed).
    root = pathlib.Path(__file__).resolve().parents[2] / "gateway"
    found = {
        m.lower()
        for path in [*root.glob("edge/*.py"), *root.glob("upstream/*.py")]
        for m in re.findall(r'b"(x-vx11-[a-z-]+)"', path.read_text())
    }
    requests = {"x-vx11-token", "x-vx11-gw-token", "x-vx11-session"}
    assert requests <= set(cors.ALLOW_HEADERS)
    exposed = {h.lower() for h in cors.EXPOSE_HEADERS}
    assert found - requests <= exposed, found - requests - exposed
    assert {"x-vx11-target", "x-vx11-fallback"} <= exposed  # SPEC §18, §19
