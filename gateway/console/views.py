"""Plain Django views: liveness, readiness, problem pages."""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from gateway.console.middleware import problem_response
from gateway.core import correlation, metrics
from gateway.core.conf import gw
from gateway.core.problems import Forbidden, InternalError, NotFound
from gateway.edge.headers import client_ip, ip_allowed
from gateway.operations.gauges import refresh_gauges
from gateway.state import store

log = logging.getLogger("gateway")
VERSION = "1.0.0"


async def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok", "module": "vx11-gateway", "version": VERSION})


def _db_ok() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return None
    except Exception as exc:
        return type(exc).__name__


def _cache_ok() -> str | None:
    try:
        cache.set("vx11:ready", "1", 5)
        if store.shared():
            store.sync_client().ping()
        return None
    except Exception as exc:
        return type(exc).__name__


async def ready(request: HttpRequest) -> JsonResponse:
    """Ready when the database and the cache answer."""
    try:
        db_error, cache_error = await asyncio.wait_for(
            asyncio.gather(sync_to_async(_db_ok)(), sync_to_async(_cache_ok)()), timeout=3.0
        )
    except TimeoutError:
        db_error = cache_error = "timeout"
    checks = {"database": db_error or "ok", "cache": cache_error or "ok"}
    ok = db_error is None and cache_error is None
    return JsonResponse(
        {"status": "ready" if ok else "not_ready", "checks": checks}, status=200 if ok else 503
    )


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def metrics_view(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``: Prometheus text, no token (``VX11_METRICS_*`` switch and allow-list)."""
    cid = correlation.current.get()
    if not gw.metrics_enabled:
        return problem_response(NotFound("Metrics are turned off (VX11_METRICS_ENABLED)."), cid)
    peer = str(request.META.get("REMOTE_ADDR") or "")
    ip, _ = client_ip(peer, request.headers.get("X-Forwarded-For"), list(gw.trusted_proxies))
    try:
        allowed = ip_allowed(ip, list(gw.metrics_allowed_ips))
    except ValueError:  # a malformed CIDR: refuse everyone rather than expose the metrics
        log.error("VX11_METRICS_ALLOWED_IPS holds an invalid network; /metrics is refused")
        allowed = False
    if not allowed:
        return problem_response(Forbidden("This address may not read the metrics."), cid)
    await refresh_gauges()
    return HttpResponse(metrics.exposition(), content_type=METRICS_CONTENT_TYPE)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return problem_response(
        NotFound(f"No endpoint at {request.path[:200]!r}."), correlation.current.get()
    )


def server_error(request: HttpRequest) -> HttpResponse:
    return problem_response(InternalError(), correlation.current.get())
