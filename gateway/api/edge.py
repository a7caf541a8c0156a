"""The edge endpoints: health-cache clear and rate-limit status (Django views).

These views are plain async Django views, not DRF ones, on purpose: they run on
the server's event loop, so the operations they call (:mod:`gateway.operations.cache`,
:mod:`gateway.operations.limits`) reach the very policies the proxy uses (its rate-limit
log, its cache), with no copy made on a loop of their own. Errors are the same problem+json answers as everywhere.
"""

from __future__ import annotations

import logging
import time

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from gateway.api.authentication import staff_principal
from gateway.config.snapshot import holder
from gateway.console.middleware import problem_response
from gateway.core import correlation
from gateway.core.conf import gw
from gateway.core.problems import AuthRequired, Forbidden, GatewayError, MethodNotAllowed
from gateway.core.tokens import hash_token
from gateway.edge import auth
from gateway.edge.headers import client_ip
from gateway.operations import limits
from gateway.operations.cache import clear_cache
from gateway.policies.scopes import build_scopes

log = logging.getLogger("gateway.edge")


# --------------------------------------------------------------------------- helpers


def _problem(exc: GatewayError) -> HttpResponse:
    return problem_response(exc, correlation.current.get())


def _caller_ip(request: HttpRequest) -> str:
    """The client IP by the proxy's rules (``VX11_TRUSTED_PROXIES``)."""
    peer = str(request.META.get("REMOTE_ADDR") or "127.0.0.1")
    ip, _ = client_ip(peer, request.headers.get("X-Forwarded-For"), list(gw.trusted_proxies))
    return ip


async def _client_principal(request: HttpRequest) -> auth.Principal:
    """The caller of a token endpoint (401 missing, 403 wrong), as the proxy sees it."""
    if not gw.auth_enabled:
        return auth.AUTH_DISABLED
    token = auth.client_token(
        request.headers.get("X-VX11-Token"), request.headers.get("Authorization")
    )
    if token is None:
        user = await request.auser()
        if user.is_authenticated and user.is_staff:
            return staff_principal(user)
        raise AuthRequired()
    principal = auth.authenticate(token, await holder.current())
    if principal is None:
        raise Forbidden("The token is not valid.")
    return principal


async def _gateway_principal(request: HttpRequest) -> auth.Principal:
    """The caller of a protected /shub path: ``X-VX11-GW-Token`` (401 missing, 403 wrong).

    As in the proxy, a valid client token sent beside it names the caller for rate limits.
    """
    if not gw.auth_enabled:
        return auth.AUTH_DISABLED
    value = request.headers.get("X-VX11-GW-Token")
    ok = auth.check_gateway_token(value)
    if ok is None:
        raise AuthRequired("Send the gateway token in X-VX11-GW-Token.", realm="vx11-gateway")
    if not ok:
        raise Forbidden("The gateway token is not valid.")
    token = auth.client_token(
        request.headers.get("X-VX11-Token"), request.headers.get("Authorization")
    )
    client = auth.authenticate(token, await holder.current()) if token else None
    if client is not None:
        return client
    digest = hash_token((value or "").strip())[:16]
    return auth.Principal("gateway", "gw:" + digest, "gateway", False)


# --------------------------------------------------------------------------- cache clear


@csrf_exempt
async def shub_cache_clear(request: HttpRequest) -> HttpResponse:
    """``POST /shub/cache/clear`` with ``X-VX11-GW-Token``."""
    try:
        principal = await _gateway_principal(request)
        if request.method != "POST":
            raise MethodNotAllowed(["POST"])
        ip = _caller_ip(request)
        headers = await limits.charge(lambda: build_scopes(principal, ip, True))
        deleted = await clear_cache("api")
    except GatewayError as exc:
        return _problem(exc)
    response = JsonResponse(
        {"status": "cleared", "keys_deleted": deleted, "timestamp": time.time()}
    )
    for name, value in headers:
        response[name] = value
    return response


# --------------------------------------------------------------------------- rate-limit status


@csrf_exempt  # read-only; other methods answer 405, not Django's CSRF page
async def rate_limit_status(request: HttpRequest) -> HttpResponse:
    """``GET /vx11/rate-limit/status``: the caller's usage per scope, consuming nothing."""
    try:
        principal = await _client_principal(request)
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(["GET", "HEAD"])
    except GatewayError as exc:
        return _problem(exc)
    body = await limits.usage(lambda: build_scopes(principal, _caller_ip(request), True))
    return JsonResponse(body)
