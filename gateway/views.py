"""Plain Django views: liveness, readiness, problem pages."""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from gateway import correlation, store
from gateway.middleware import problem_response
from gateway.problems import InternalError, NotFound

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


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return problem_response(
        NotFound(f"No endpoint at {request.path[:200]!r}."), correlation.current.get()
    )


def server_error(request: HttpRequest) -> HttpResponse:
    return problem_response(InternalError(), correlation.current.get())
