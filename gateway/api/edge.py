"""The edge endpoints: health-cache clear, rate-limit status, scrape-time gauges.

These views are plain async Django views, not DRF ones, on purpose: they run on
the server's event loop, so ``services.get()`` returns the very policies the
proxy uses (its rate-limit log, its cache, its breaker store), with no copy made
on a loop of their own. Errors are the same problem+json answers as everywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from gateway.config.snapshot import holder
from gateway.console.middleware import problem_response
from gateway.core import correlation, metrics
from gateway.core.conf import gw
from gateway.core.problems import (
    AuthRequired,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    TooManyRequests,
    UpstreamUnavailable,
)
from gateway.edge import auth
from gateway.edge.headers import client_ip
from gateway.operations import events
from gateway.operations import registry as services
from gateway.policies.ratelimit import STORE_ERRORS

log = logging.getLogger("gateway.edge")
CLEAR_TIMEOUT = 5.0  # seconds: a Redis outage answers 503 instead of hanging the caller


class CacheStoreUnavailable(UpstreamUnavailable):
    """The shared cache could not be reached, so nothing was cleared."""

    title = "Cache store unavailable"


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
            return auth.Principal("staff", f"user:{user.pk}", str(user), True)
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
    digest = hashlib.sha256((value or "").strip().encode()).hexdigest()[:16]
    return auth.Principal("gateway", "gw:" + digest, "gateway", False)


# --------------------------------------------------------------------------- cache clear


async def _clear_store() -> int:
    try:
        return await asyncio.wait_for(services.get().cache.clear(), CLEAR_TIMEOUT)
    except STORE_ERRORS as exc:
        raise CacheStoreUnavailable(
            f"The shared cache did not answer ({type(exc).__name__}); nothing was cleared."
        ) from None


def _cleared(deleted: int, source: str) -> None:
    log.info("gateway cache cleared", extra={"keys_deleted": deleted, "source": source})
    events.emit({"type": "cache.cleared", "keys_deleted": deleted, "source": source})


async def clear_cache(source: str) -> int:
    """Empty the shared health cache (the one the proxy serves from); emit ``cache.cleared``.

    Raises :class:`CacheStoreUnavailable` when the store does not answer in time.
    """
    deleted = await _clear_store()
    _cleared(deleted, source)
    return deleted


def clear_cache_sync(source: str) -> int:
    """:func:`clear_cache` for sync callers (management command, admin view).

    Inside the ASGI server ``async_to_sync`` runs the clear on the server's loop;
    the event is emitted here, from sync code, so it is published before returning
    (a queued event would die with a command's private loop).
    """
    deleted = int(async_to_sync(_clear_store)())
    _cleared(deleted, source)
    return deleted


@csrf_exempt
async def shub_cache_clear(request: HttpRequest) -> HttpResponse:
    """``POST /shub/cache/clear`` with ``X-VX11-GW-Token``."""
    try:
        principal = await _gateway_principal(request)
        if request.method != "POST":
            raise MethodNotAllowed(["POST"])
        headers = await _charge(principal, _caller_ip(request), protected=True)
        deleted = await clear_cache("api")
    except GatewayError as exc:
        return _problem(exc)
    response = JsonResponse(
        {"status": "cleared", "keys_deleted": deleted, "timestamp": time.time()}
    )
    for name, value in headers:
        response[name] = value
    return response


async def _charge(principal: auth.Principal, ip: str, *, protected: bool) -> list[tuple[str, str]]:
    """Count one request against the caller's limits, as the proxy does for /shub."""
    if not gw.rate_limit_enabled:
        return []
    from gateway.edge.pipeline import build_scopes
    from gateway.policies.ratelimit import ratelimit_headers

    decision = await services.get().limiter.check(build_scopes(principal, ip, protected))
    headers = ratelimit_headers(decision)
    if decision.would_refuse and decision.refused_by is not None:
        metrics.rate_limited(decision.refused_by.name)
    if not decision.allowed:
        scope = decision.refused_by.name if decision.refused_by else "token"
        raise TooManyRequests(scope, decision.retry_after, headers)
    return headers


def admin_clear_cache(request: HttpRequest) -> HttpResponse:
    """Admin page: a confirmation form whose POST clears the cache (staff only, CSRF-checked)."""
    if request.method == "POST":
        try:
            deleted = clear_cache_sync("admin")
        except GatewayError as exc:
            messages.error(request, exc.detail)
        else:
            messages.success(request, f"Gateway cache cleared: {deleted} key(s) deleted.")
        return HttpResponseRedirect(reverse("admin:index"))
    from django.contrib import admin

    context: dict[str, Any] = {
        **admin.site.each_context(request),
        "title": "Clear the gateway cache",
        "cache_ttl": gw.cache_ttl_health,
        "shared": bool(gw.redis_url),
    }
    return TemplateResponse(request, "admin/gateway/cache_clear.html", context)


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
    enabled = bool(gw.rate_limit_enabled)
    body: dict[str, Any] = {
        "enabled": enabled,
        "enforced": enabled and bool(gw.rate_limit_enforce),
        "degraded": False,
        "scopes": [],
    }
    if enabled:
        from gateway.edge.pipeline import build_scopes

        limiter = services.get().limiter
        decision = await limiter.status(build_scopes(principal, _caller_ip(request), True))
        body["degraded"] = decision.degraded or limiter.degraded
        body["scopes"] = [
            {
                "scope": r.scope.name,
                "limit": r.scope.limit,
                "remaining": r.remaining,
                "reset": math.ceil(round(r.reset, 6)),
                "window": r.scope.window,
            }
            for r in decision.results
        ]
    return JsonResponse(body)


# --------------------------------------------------------------------------- scrape gauges


def _db_gauges() -> None:
    from gateway.models import ModuleHealth
    from sessions_ctx7.models import Session

    for module, status in ModuleHealth.objects.values_list("module", "status"):
        if status in ("up", "down"):
            metrics.module_up(module, status == "up")
    metrics.context7_active(Session.objects.filter(expires_at__gt=timezone.now()).count())


async def refresh_gauges() -> None:
    """Gauges read at scrape time: breaker states, module health, live Context-7 sessions.

    A failing source leaves its gauges as they were: a scrape must still answer.
    """
    try:
        snapshot = await holder.current()
        statuses = await asyncio.wait_for(
            services.get().breaker.statuses(sorted(snapshot.modules)), 2.0
        )
        for module, status in statuses.items():
            metrics.breaker_state(module, status.state)
    except Exception as exc:
        log.warning("breaker gauges not refreshed", extra={"error": type(exc).__name__})
    try:
        await sync_to_async(_db_gauges, thread_sensitive=False)()
    except Exception as exc:
        log.warning("database gauges not refreshed", extra={"error": type(exc).__name__})
