"""OpenAPI: the proxy endpoints are served by the lean ASGI handler, not DRF, so they
are described here and added to the generated schema."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM}},
    }


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details, with a stable `error` code.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "error": {"type": "string", "example": "circuit_open"},
        "correlation_id": {"type": "string"},
        "module": {"type": "string"},
        "retry_after": {"type": "integer"},
        "scope": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail", "error", "correlation_id"],
}


def add_proxy_paths(
    result: dict[str, Any],
    generator: Any,
    request: Any,
    public: bool,
) -> dict[str, Any]:
    result.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    intent_param = {
        "name": "intent",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "example": "chat"},
    }
    common = {
        "400": _problem("Malformed JSON, bad session id or bad path"),
        "401": _problem("No credentials"),
        "403": _problem("Wrong credentials"),
        "404": _problem("Unknown intent"),
        "413": _problem("Body over VX11_MAX_BODY_BYTES"),
        "429": _problem("Rate limited (see RateLimit headers)"),
        "502": _problem("Invalid upstream answer"),
        "503": _problem("circuit_open, service_overloaded or upstream_unavailable"),
        "504": _problem("Upstream timeout"),
    }
    result.setdefault("paths", {})["/vx11/route/{intent}"] = {
        "post": {
            "operationId": "route_intent",
            "summary": "Proxy an intent to its module",
            "description": "Sends the JSON body and query string to the route's module endpoint "
            "with the route's method and timeout, through breaker, retries, backpressure and "
            "rate limits. The upstream status, body and content type come back unchanged with "
            "X-Correlation-ID, X-VX11-Intent and X-VX11-Module. Context-7 routes (chat, code) "
            "take `session_id` (or X-VX11-Session) and return X-VX11-Session.",
            "tags": ["proxy"],
            "parameters": [
                intent_param,
                {
                    "name": "X-VX11-Session",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                },
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": True,
                            "example": {"prompt": "hello", "session_id": "demo-1"},
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "The module's answer, unchanged",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **common,
            },
        }
    }
    shub_ops: dict[str, Any] = {}
    for method in ("get", "post", "put", "patch", "delete"):
        shub_ops[method] = {
            "operationId": f"shub_proxy_{method}",
            "summary": f"{method.upper()} a path on module shub",
            "description": "Forwarded to shub with /shub stripped. Public: /shub/health, "
            "/shub/ready, /shub/openapi.json; others need X-VX11-GW-Token. GET /shub/health "
            "and /shub/ready are cached (Cache-Status, X-Cache).",
            "tags": ["proxy"],
            "security": [{"GatewayToken": []}, {}],
            "parameters": [
                {
                    "name": "path",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "example": "health"},
                }
            ],
            "responses": {"200": {"description": "Shub's answer, unchanged"}, **common},
        }
    result["paths"]["/shub/{path}"] = shub_ops
    result["paths"].update(_plain_views())
    return result


def _plain_views() -> dict[str, Any]:
    """Endpoints served by plain (async) Django views rather than DRF."""

    def op(
        op_id: str,
        summary: str,
        tag: str,
        security: list[Any] | None = None,
        responses: dict[str, Any] | None = None,
        example: Any = None,
    ) -> dict[str, Any]:
        ok: dict[str, Any] = {"description": "OK"}
        if example is not None:
            ok["content"] = {"application/json": {"example": example}}
        body: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "tags": [tag],
            "responses": {"200": ok, **(responses or {})},
        }
        if security is not None:
            body["security"] = security
        return body

    return {
        "/health": {
            "get": op(
                "health",
                "Liveness (no auth)",
                "gateway",
                [],
                example={"status": "ok", "module": "vx11-gateway", "version": "1.0.0"},
            )
        },
        "/ready": {
            "get": op(
                "ready",
                "Readiness: database and cache reachable (no auth)",
                "gateway",
                [],
                {"503": {"description": "Not ready"}},
                example={"status": "ready", "checks": {"database": "ok", "cache": "ok"}},
            )
        },
        "/metrics": {
            "get": op(
                "metrics",
                "Prometheus metrics (VX11_METRICS_ALLOWED_IPS)",
                "gateway",
                [],
                {"403": _problem("Address not allowed")},
            )
        },
        "/vx11/rate-limit/status": {
            "get": op(
                "rate_limit_status",
                "The caller's current usage per rate-limit scope",
                "gateway",
                responses={"401": _problem("No credentials"), "403": _problem("Wrong credentials")},
                example={
                    "enabled": True,
                    "enforced": True,
                    "degraded": False,
                    "scopes": [
                        {
                            "scope": "token",
                            "limit": 1000,
                            "remaining": 998,
                            "reset": 41,
                            "window": 60,
                        }
                    ],
                },
            )
        },
        "/shub/cache/clear": {
            "post": op(
                "shub_cache_clear",
                "Empty the health cache (X-VX11-GW-Token)",
                "proxy",
                [{"GatewayToken": []}],
                {"401": _problem("No gateway token"), "403": _problem("Wrong gateway token")},
                example={"status": "cleared", "keys_deleted": 2, "timestamp": 1763780000.0},
            )
        },
    }


class GatewayTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Tells drf-spectacular how the gateway's token authentication looks."""

    target_class = "gateway.api.authentication.GatewayTokenAuthentication"
    name = ["VX11Token", "Bearer"]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        return [
            {"type": "apiKey", "in": "header", "name": "X-VX11-Token"},
            {"type": "http", "scheme": "bearer"},
        ]
