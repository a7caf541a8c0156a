"""Django-side middleware: correlation ids and problem+json for unexpected errors."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import (
    BadRequest,
    PermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
)
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase

from gateway.core import correlation
from gateway.core.problems import GatewayError, InternalError, InvalidRequest, PayloadTooLarge

log = logging.getLogger("gateway")
_DJANGO_HANDLED = (Http404, PermissionDenied, SuspiciousOperation, BadRequest)


def problem_response(exc: GatewayError, cid: str) -> HttpResponse:
    status, headers, body = exc.render(cid)
    response = HttpResponse(body, status=status, content_type=dict(headers)["content-type"])
    for key, value in headers:
        if key != "content-type":
            response[key] = value
    return response


def _refuse_nul(request: HttpRequest, cid: str) -> HttpResponse | None:
    """A NUL in the decoded query string → 400 naming the parameters: PostgreSQL text
    cannot hold one, so a filter such as the admin's ``?client=%00`` would otherwise end
    in a 500 (DataError)."""
    if "%00" not in request.META.get("QUERY_STRING", ""):
        return None  # the common case: no encoded NUL, nothing to decode
    bad = sorted(
        key.replace("\x00", "\\0")
        for key, values in request.GET.lists()
        if "\x00" in key or any("\x00" in value for value in values)
    )
    if not bad:
        return None
    error = InvalidRequest(
        f"The query string contains a NUL character ({', '.join(bad)}).",
        errors={name: ["NUL characters are not allowed."] for name in bad},
    )
    return problem_response(error, cid)


class CorrelationMiddleware:
    """Keeps or replaces the correlation id, stamps it on logs and on the answer."""

    async_capable = True
    sync_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _begin(self, request: HttpRequest) -> str:
        cid = correlation.pick(
            request.headers.get("X-Correlation-ID"), request.headers.get("X-Request-ID")
        )
        request.correlation_id = cid  # type: ignore[attr-defined]
        correlation.current.set(cid)
        return cid

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self._acall(request)
        cid = self._begin(request)
        refused = _refuse_nul(request, cid)
        response = refused if refused is not None else self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        response["X-Correlation-ID"] = cid
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        cid = self._begin(request)
        refused = _refuse_nul(request, cid)
        if refused is not None:
            response: HttpResponseBase = refused
        else:
            result = self.get_response(request)
            response = await result if not isinstance(result, HttpResponseBase) else result
        response["X-Correlation-ID"] = cid
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        cid = getattr(request, "correlation_id", correlation.current.get())
        if isinstance(exception, GatewayError):
            return problem_response(exception, cid)
        if isinstance(exception, RequestDataTooBig):  # DATA_UPLOAD_MAX_MEMORY_SIZE
            return problem_response(PayloadTooLarge("The request body is too large."), cid)
        if isinstance(exception, _DJANGO_HANDLED):
            return None  # Django answers these itself (404, 403, 400) through its handlers
        log.error("unexpected error", exc_info=exception, extra={"path": request.path})
        return problem_response(InternalError(), cid)
