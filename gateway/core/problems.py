"""Errors the gateway produces, as RFC 9457 ``application/problem+json``.

Domain code raises a :class:`GatewayError` subclass; this module is the one
place that turns it into a status, headers and a body — for the lean proxy
handler and (through ``gateway.api.exceptions``) for the DRF views alike.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "https://vx11.dev/problems/"


class GatewayError(Exception):
    status = 500
    code = "internal_error"
    title = "Internal error"

    def __init__(
        self, detail: str = "", *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self, correlation_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": TYPE_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "error": self.code,
            "correlation_id": correlation_id,
        }
        body.update(self.extra)
        return body

    def render(self, correlation_id: str) -> tuple[int, list[tuple[str, str]], bytes]:
        payload = orjson.dumps(self.body(correlation_id))
        headers = [("content-type", PROBLEM_CONTENT_TYPE), *self.headers.items()]
        return self.status, headers, payload


def retry_after_value(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class AuthRequired(GatewayError):
    status, code, title = 401, "auth_required", "Authentication required"

    def __init__(self, detail: str = "", *, realm: str = "vx11", **extra: Any) -> None:
        super().__init__(
            detail or "Send a token in X-VX11-Token or Authorization: Bearer.",
            headers={"WWW-Authenticate": f'Bearer realm="{realm}"'},
            **extra,
        )


class Forbidden(GatewayError):
    status, code, title = 403, "forbidden", "Forbidden"


class UnknownIntent(GatewayError):
    status, code, title = 404, "unknown_intent", "Unknown intent"


class NotFound(GatewayError):
    status, code, title = 404, "not_found", "Not found"


class MethodNotAllowed(GatewayError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"

    def __init__(self, allowed: list[str], detail: str = "") -> None:
        super().__init__(
            detail or f"Allowed: {', '.join(allowed)}.", headers={"Allow": ", ".join(allowed)}
        )


class InvalidRequest(GatewayError):
    status, code, title = 400, "invalid_request", "Invalid request"


class PayloadTooLarge(GatewayError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class RequestTimeout(GatewayError):
    """The client stopped sending its request body (``VX11_CLIENT_BODY_TIMEOUT``).

    The connection is closed after the answer, as nginx does for ``client_body_timeout``:
    the rest of a half-sent body must not be read as the next request.
    """

    status, code, title = 408, "request_timeout", "Request timeout"

    def __init__(self, detail: str = "", **extra: Any) -> None:
        super().__init__(detail, headers={"Connection": "close"}, **extra)


class TooManyRequests(GatewayError):
    status, code, title = 429, "too_many_requests", "Too many requests"

    def __init__(self, scope: str, retry_after: float, headers: list[tuple[str, str]]) -> None:
        super().__init__(
            f"Rate limit for scope {scope!r} reached; retry in {retry_after_value(retry_after)} s.",
            scope=scope,
            retry_after=math.ceil(retry_after),
        )
        self.headers = dict(headers)
        self.headers.setdefault("Retry-After", retry_after_value(retry_after))


class CircuitOpen(GatewayError):
    status, code, title = 503, "circuit_open", "Circuit open"

    def __init__(self, module: str, retry_after: float, state: str = "open") -> None:
        super().__init__(
            f"Module {module!r} is failing; calls are refused for "
            f"{retry_after_value(retry_after)} s.",
            headers={"Retry-After": retry_after_value(retry_after)},
            module=module,
            state=state,
            retry_after=math.ceil(retry_after),
        )


class ServiceOverloaded(GatewayError):
    status, code, title = 503, "service_overloaded", "Service overloaded"

    def __init__(
        self, retry_after: float = 1.0, *, module: str | None = None, **extra: Any
    ) -> None:
        """``module``: shed by that module's own cap (its bulkhead), not the process's."""
        if module is not None:
            extra["module"] = module
        super().__init__(
            "The gateway is at capacity; retry shortly."
            if module is None
            else f"Module {module!r} is at its concurrency cap; retry shortly.",
            headers={"Retry-After": retry_after_value(retry_after)},
            retry_after=math.ceil(retry_after),
            **extra,
        )


class UpstreamUnavailable(GatewayError):
    status, code, title = 503, "upstream_unavailable", "Upstream unavailable"


class ShubUnavailable(UpstreamUnavailable):
    code, title = "shub_unavailable", "Shub unavailable"


class UpstreamTimeout(GatewayError):
    status, code, title = 504, "upstream_timeout", "Upstream timeout"


class BadGateway(GatewayError):
    status, code, title = 502, "bad_gateway", "Bad gateway"


class InternalError(GatewayError):
    status, code, title = 500, "internal_error", "Internal error"

    def __init__(self) -> None:
        super().__init__(
            "An unexpected error occurred; it has been logged with the correlation id."
        )
