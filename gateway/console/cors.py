"""CORS on the Django side (management API, docs, health, metrics): the proxy's rules.

The proxy paths bypass Django (``gateway.edge.observed`` applies CORS there); this
middleware applies the same :class:`gateway.core.cors.Policy` to everything Django serves
except the admin and the dashboard (``/admin/``: a staff UI on the gateway's own origin,
whose session a foreign page must not ride) and static files. It sits right after
``CorrelationMiddleware``, so a preflight's 204 carries ``X-Correlation-ID`` too, and
before everything that could refuse the request first (HTTPS redirect, CSRF,
authentication). CORS unconfigured: one falsy check, the answer untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from gateway.core import cors
from gateway.core.conf import gw

#: Paths left alone (the staff UI and static files).
EXCLUDED = ("/admin/", "/admin", "/static/")


def _policy(request: HttpRequest) -> cors.Policy | None:
    origins = gw.cors_allowed_origins
    if not origins or request.path.startswith(EXCLUDED):
        return None
    return cors.policy(origins, gw.cors_allow_credentials)


def preflight(policy: cors.Policy, request: HttpRequest) -> HttpResponse | None:
    """The gateway's own 204 to a preflight from an allowed origin (no auth, no view)."""
    origin = request.headers.get("Origin")
    if not policy.is_preflight(
        request.method or "", origin, request.headers.get("Access-Control-Request-Method")
    ):
        return None
    assert origin is not None
    response = HttpResponse(status=204)
    for name, value in policy.preflight_headers(origin):
        response[name] = value
    return response


def decorate(policy: cors.Policy, request: HttpRequest, response: HttpResponseBase) -> None:
    """An actual answer as the proxy paths give it (``cors.Policy.apply``)."""
    for name in [name for name in response.headers if cors.is_cors_header(name)]:
        del response[name]
    response["Vary"] = cors.vary_with_origin(response.get("Vary"))
    for name, value in policy.answer_headers(request.headers.get("Origin")):
        response[name] = value


class CorsMiddleware:
    """``gateway.core.cors`` for the pages Django serves."""

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

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self._acall(request)
        policy = _policy(request)
        if policy is None:
            return self.get_response(request)
        answered = preflight(policy, request)
        if answered is not None:
            return answered
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        decorate(policy, request, response)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        policy = _policy(request)
        result: HttpResponseBase | Awaitable[HttpResponseBase]
        if policy is None:
            result = self.get_response(request)
            return await result if not isinstance(result, HttpResponseBase) else result
        answered = preflight(policy, request)
        if answered is not None:
            return answered
        result = self.get_response(request)
        response = await result if not isinstance(result, HttpResponseBase) else result
        decorate(policy, request, response)
        return response
