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
        "errors": {
            "description": "invalid_request: the refused fields, each with its messages.",
            "oneOf": [{"type": "object"}, {"type": "array"}],
        },
    },
    "required": ["type", "title", "status", "detail", "error", "correlation_id"],
}
#: What the management API (DRF views) can answer besides its documented successes.
_MANAGEMENT_ERRORS = {
    "400": "invalid_request: malformed JSON, a bad or unknown field, a bad parameter",
    "401": "auth_required: no credentials",
    "403": "forbidden: wrong credentials, or a change without admin rights",
    "404": "not_found: no such intent, module or session",
    "413": "payload_too_large: the body is over the management API's limit",
}
_PROXY_PATHS = ("/vx11/route/{intent}", "/shub/{path}")


def _document_problems(paths: dict[str, Any]) -> None:
    """Every error status a management operation can answer, as problem+json.

    400 where the caller sends something to validate (a body, query or path
    parameters), 404 where a path parameter names something, 413 where there is a
    body, 401/403 where credentials are needed.
    """
    for path, operations in paths.items():
        if path.startswith(_PROXY_PATHS):
            continue
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            parameters = operation.get("parameters", [])
            codes = []
            if operation.get("security", [{}]) != []:
                codes += ["401", "403"]
            if "requestBody" in operation or parameters:
                codes.append("400")
            if any(p.get("in") == "path" for p in parameters):
                codes.append("404")
            if "requestBody" in operation:
                codes.append("413")
            responses = operation["responses"]
            for code in sorted(codes):
                responses.setdefault(code, _problem(_MANAGEMENT_ERRORS[code]))


_ANY: dict[str, Any] = {"*/*": {"schema": {}}}
#: A module's own error answer (any status, any media type) passes through unchanged.
_UPSTREAM_ANSWER: dict[str, Any] = {
    "description": "The module's own answer, passed through unchanged (any status)",
    "content": _ANY,
}


_INTENT_PARAM: dict[str, Any] = {
    "name": "intent",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "example": "chat"},
}


def _proxy_errors() -> dict[str, Any]:
    """What a proxied call can answer besides the module's own answer."""
    return {
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


def _header_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}


def _route_intent(common: dict[str, Any]) -> dict[str, Any]:
    """``POST /vx11/route/{intent}``."""
    return {
        "post": {
            "operationId": "route_intent",
            "summary": "Proxy an intent to its module",
            "description": "Sends the JSON body and query string to the route's module endpoint "
            "with the route's method and timeout, through breaker, retries, backpressure and "
            "rate limits. The upstream status, body and content type come back unchanged with "
            "X-Correlation-ID, X-VX11-Intent and X-VX11-Module. Context-7 routes (chat, code) "
            "take `session_id` (or X-VX11-Session) and return X-VX11-Session. A route with "
            "`fallbacks` tries them in order when its module cannot answer; an answer from a "
            "fallback names it in X-VX11-Module and says `X-VX11-Fallback: <reason>; "
            "from=<module>` (SPEC §19).",
            "tags": ["proxy"],
            "parameters": [
                _INTENT_PARAM,
                _header_param("X-VX11-Session"),
                _header_param("Idempotency-Key"),
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
                "default": _UPSTREAM_ANSWER,
            },
        }
    }


def _shub_operation(method: str, common: dict[str, Any]) -> dict[str, Any]:
    """One method of ``/shub/{path}``."""
    return {
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
        "responses": {
            "200": {"description": "Shub's answer, unchanged", "content": _ANY},
            **common,
            "default": _UPSTREAM_ANSWER,
        },
    }


def add_proxy_paths(
    result: dict[str, Any],
    generator: Any,
    request: Any,
    public: bool,
) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: the lean handler's paths and the plain views."""
    result.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    common = _proxy_errors()
    result.setdefault("paths", {})["/vx11/route/{intent}"] = _route_intent(common)
    result["paths"]["/shub/{path}"] = {
        method: _shub_operation(method, common)
        for method in ("get", "post", "put", "patch", "delete")
    }
    _document_problems(result["paths"])  # the DRF operations, before the plain views
    result["paths"].update(_plain_views())
    return result


def _object(properties: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = sorted(properties)
    return schema


_STRING, _NUMBER, _INTEGER, _BOOLEAN = (
    {"type": "string"},
    {"type": "number"},
    {"type": "integer"},
    {"type": "boolean"},
)
_READY = _object(
    {
        "status": {"type": "string", "enum": ["ready", "not_ready"]},
        "checks": _object({"database": _STRING, "cache": _STRING}),
    }
)
_RATE_LIMIT_STATUS = _object(
    {
        "enabled": _BOOLEAN,
        "enforced": _BOOLEAN,
        "degraded": _BOOLEAN,
        "scopes": {
            "type": "array",
            "items": _object(
                {
                    "scope": _STRING,
                    "limit": _INTEGER,
                    "remaining": _INTEGER,
                    "reset": _INTEGER,
                    "window": _INTEGER,
                }
            ),
        },
    }
)


def _json(description: str, schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"description": description, "content": {"application/json": media}}


def _op(
    op_id: str,
    summary: str,
    tag: str,
    responses: dict[str, Any],
    security: list[Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "tags": [tag],
        "responses": responses,
    }
    if security is not None:
        body["security"] = security
    return body


def _probe_views() -> dict[str, Any]:
    """``/health``, ``/ready`` and ``/metrics``: no credentials."""
    return {
        "/health": {
            "get": _op(
                "health",
                "Liveness (no auth)",
                "gateway",
                {
                    "200": _json(
                        "Alive",
                        _object({"status": _STRING, "module": _STRING, "version": _STRING}),
                        {"status": "ok", "module": "vx11-gateway", "version": "1.0.0"},
                    )
                },
                [],
            )
        },
        "/ready": {
            "get": _op(
                "ready",
                "Readiness: database and cache reachable (no auth)",
                "gateway",
                {
                    "200": _json(
                        "Ready",
                        _READY,
                        {"status": "ready", "checks": {"database": "ok", "cache": "ok"}},
                    ),
                    "503": _json("Not ready: the failing check names its error", _READY),
                },
                [],
            )
        },
        "/metrics": {
            "get": _op(
                "metrics",
                "Prometheus metrics (VX11_METRICS_ALLOWED_IPS)",
                "gateway",
                {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": _STRING}},
                    },
                    "403": _problem("Address not allowed"),
                },
                [],
            )
        },
    }


_RATE_LIMIT_EXAMPLE = {
    "enabled": True,
    "enforced": True,
    "degraded": False,
    "scopes": [{"scope": "token", "limit": 1000, "remaining": 998, "reset": 41, "window": 60}],
}


def _edge_views() -> dict[str, Any]:
    """``/vx11/rate-limit/status`` and ``/shub/cache/clear`` (``gateway.api.edge``)."""
    credentials = {"401": _problem("No credentials"), "403": _problem("Wrong credentials")}
    cleared = _object({"status": _STRING, "keys_deleted": _INTEGER, "timestamp": _NUMBER})
    return {
        "/vx11/rate-limit/status": {
            "get": _op(
                "rate_limit_status",
                "The caller's current usage per rate-limit scope",
                "gateway",
                {
                    "200": _json(
                        "Usage per scope (nothing is consumed)",
                        _RATE_LIMIT_STATUS,
                        _RATE_LIMIT_EXAMPLE,
                    ),
                    **credentials,
                },
            )
        },
        "/shub/cache/clear": {
            "post": _op(
                "shub_cache_clear",
                "Empty the health cache (X-VX11-GW-Token)",
                "proxy",
                {
                    "200": _json(
                        "Cleared",
                        cleared,
                        {"status": "cleared", "keys_deleted": 2, "timestamp": 1763780000.0},
                    ),
                    "401": _problem("No gateway token"),
                    "403": _problem("Wrong gateway token"),
                    "429": _problem("Rate limited (see RateLimit headers)"),
                    "503": _problem("The shared cache store did not answer; nothing was cleared"),
                },
                [{"GatewayToken": []}],
            )
        },
    }


def _plain_views() -> dict[str, Any]:
    """Endpoints served by plain (async) Django views rather than DRF."""
    return {**_probe_views(), **_edge_views()}


class GatewayTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Tells drf-spectacular how the gateway's token authentication looks."""

    target_class = "gateway.api.authentication.GatewayTokenAuthentication"
    name = ["VX11Token", "Bearer"]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        return [
            {"type": "apiKey", "in": "header", "name": "X-VX11-Token"},
            {"type": "http", "scheme": "bearer"},
        ]
