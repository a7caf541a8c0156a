"""DRF exceptions → problem+json, through the same catalogue as the proxy."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from gateway.core import correlation
from gateway.core.problems import (
    AuthRequired,
    Forbidden,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    TooManyRequests,
)


def to_gateway_error(exc: Exception) -> GatewayError | None:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, Http404 | exceptions.NotFound):
        return NotFound(str(exc) if str(exc) else "Not found.")
    if isinstance(exc, exceptions.NotAuthenticated):
        return AuthRequired()
    if isinstance(
        exc, exceptions.AuthenticationFailed | exceptions.PermissionDenied | DjangoPermissionDenied
    ):
        return Forbidden(str(getattr(exc, "detail", "")) or "Not allowed.")
    if isinstance(exc, exceptions.MethodNotAllowed):
        return MethodNotAllowed([], str(exc.detail))
    if isinstance(exc, exceptions.Throttled):
        return TooManyRequests("management", float(getattr(exc, "wait", None) or 1), [])
    if isinstance(exc, exceptions.ValidationError):
        names = ", ".join(map(str, exc.detail)) if isinstance(exc.detail, dict) else ""
        detail = f"Invalid fields: {names}." if names else "The request has invalid fields."
        return InvalidRequest(detail, errors=exc.detail)
    if isinstance(exc, exceptions.APIException):
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
        return err
    return None


def problem_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    error = to_gateway_error(exc)
    if error is None:
        return None  # not ours: the middleware turns it into a 500 problem
    body = error.body(correlation.current.get())
    headers = dict(error.headers)
    if isinstance(exc, exceptions.MethodNotAllowed):
        view = context.get("view")
        if view is not None:
            headers["Allow"] = ", ".join(view.allowed_methods)
    request = context.get("request")
    renderer = getattr(request, "accepted_renderer", None)
    fmt = getattr(renderer, "format", "json")
    if request is not None and fmt not in ("json", "api"):
        # An error is problem+json whatever the success format (YAML on /vx11/config);
        # only the browsable API keeps its HTML page for people.
        request.accepted_renderer, request.accepted_media_type = JSONRenderer(), "application/json"
        fmt = "json"
    is_json = renderer is None or fmt == "json"
    return Response(
        body,
        status=error.status,
        headers=headers,
        content_type="application/problem+json" if is_json else None,
    )
