"""Builds the ASGI application and refuses to start when it would be unsafe."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import sys
from typing import Any, NoReturn

from django.conf import settings

from gateway import upstream
from gateway.core import correlation
from gateway.core.asgi import Receive, Scope, Send, send_bytes
from gateway.core.conf import gw
from gateway.edge.limits import MAX_HEADER_BYTES, MAX_HEADER_COUNT, HeadersTooLarge
from gateway.state.redis_url import UnsupportedRedisURL, check_url

log = logging.getLogger("gateway")


#: The HTTP protocol class, as an import string (uvicorn's ``--http`` accepts one).
HTTP_PROTOCOL = "gateway.edge.server:GatewayHttpProtocol"


def server_command(host: str, port: int, workers: int = 1, *extra: str) -> list[str]:
    """The uvicorn command line every launcher uses (dev run, benchmark, test processes).

    ``--no-proxy-headers`` is not optional: uvicorn would otherwise trust
    X-Forwarded-For from any local peer; the gateway applies ``VX11_TRUSTED_PROXIES``
    itself. ``--http gateway.edge.server:GatewayHttpProtocol`` is uvicorn's httptools protocol
    with the head limits, head and idle deadlines and the connection cap
    (``gateway/edge/server.py``); uvicorn's ``--timeout-keep-alive`` (5 s) is its idle deadline.
    The README's production command and the Dockerfile use the same flags.
    """
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "vx11site.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        HTTP_PROTOCOL,
        "--no-access-log",
        "--no-proxy-headers",
        "--log-level",
        "warning",
        *extra,
    ]


def stop_supervisor() -> None:
    """Under ``uvicorn --workers N`` the app is loaded in worker processes that uvicorn
    restarts forever when they die; a refusal to start must stop the whole server, so
    the worker asks its supervisor (the multiprocessing parent) to shut down."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        os.kill(parent.pid, signal.SIGTERM)


def refuse_to_start(reason: str) -> NoReturn:
    """Stop loading: the reason on stderr, the supervisor told not to respawn workers."""
    message = f"VX11 Gateway refuses to start: {reason}"
    print(message, file=sys.stderr, flush=True)
    stop_supervisor()
    raise SystemExit(message)


def check_production_auth() -> None:
    """Auth on, no token, DEBUG off: refuse to load (the server exits with the reason)."""
    if gw.auth_enabled and not gw.token and not settings.DEBUG:
        refuse_to_start(
            "authentication is on but VX11_TOKEN is empty. "
            "Set VX11_TOKEN to one or more secret tokens (comma-separated), or "
            "VX11_AUTH_ENABLED=false for development only."
        )
    if not gw.auth_enabled:
        log.warning(
            "AUTHENTICATION IS DISABLED (VX11_AUTH_ENABLED=false): development only, "
            "every caller has operator rights"
        )


def check_store_url() -> None:
    """A Redis URL the request path's connection cannot honour: refuse to load, with the
    reason (``manage.py check`` reports the same as ``gateway.E003``), rather than fail
    every proxied call."""
    if not gw.redis_url:
        return
    try:
        check_url(gw.redis_url)
    except UnsupportedRedisURL as exc:
        refuse_to_start(str(exc))


# The head limits (``MAX_HEADER_BYTES``, ``MAX_HEADER_COUNT``, ``HeadersTooLarge``) live in
# ``gateway.edge.limits``, shared with the server protocol; imported above, so
# ``gateway.startup.MAX_HEADER_BYTES`` and the others still resolve.


async def refuse_oversized_headers(send: Send) -> None:
    cid = correlation.new_id()
    status, headers, body = HeadersTooLarge().render(cid)
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    await send_bytes(send, status, [*raw, (b"x-correlation-id", cid.encode())], body)


class HttpDispatcher:
    """Routes HTTP by path prefix: proxy paths to the lean handler, the rest to Django."""

    def __init__(self, proxy: Any, django_app: Any) -> None:
        self.proxy = proxy
        self.django = django_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers", ())
        if len(headers) > MAX_HEADER_COUNT or (
            sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES
        ):
            await refuse_oversized_headers(send)
            return
        path: str = scope["path"]
        if path.startswith("/vx11/route/") or (
            (path == "/shub" or path.startswith("/shub/")) and path != "/shub/cache/clear"
        ):
            await self.proxy(scope, receive, send)
        else:
            await self.django(scope, receive, send)


def tune_gc() -> None:
    """Fewer, cheaper garbage collections on the request path.

    The proxy allocates many short-lived objects per request; with CPython's
    default thresholds (700, 10, 10) that means a young-generation collection
    every few requests and periodic full collections over every long-lived
    object (p99 spikes). Freezing what start-up created and raising the
    young-generation threshold is the usual server tuning (measured in
    docs/PERFORMANCE.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class Lifespan:
    """ASGI lifespan: the server's loop made known; pooled connections closed on shutdown.

    Breaker commands from other processes (no Redis) are applied on that loop, where the
    proxy's in-memory breakers and the events queue live (``gateway.operations.registry``).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from gateway.edge import tracing  # deferred: imports gateway.models
        from gateway.operations import registry as services  # deferred: imports gateway.models

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                tune_gc()
                services.breaker_commands.serve_on(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                services.breaker_commands.serve_on(None)
                await upstream.close()
                await tracing.shutdown()  # the last spans, for a bounded time
                await send({"type": "lifespan.shutdown.complete"})
                return


def websocket_application() -> Any:
    """``/ws/events`` (staff session cookie or admin token); other paths are refused."""
    from channels.auth import AuthMiddlewareStack
    from channels.routing import URLRouter
    from channels.security.websocket import WebsocketDenier
    from django.urls import path, re_path

    from gateway.console.consumers import EventsConsumer  # deferred: imports gateway.models

    return AuthMiddlewareStack(
        URLRouter(
            [
                path("ws/events", EventsConsumer.as_asgi()),
                re_path(r"", WebsocketDenier.as_asgi()),
            ]
        )
    )


def build_application(django_app: Any) -> Any:
    from channels.routing import ProtocolTypeRouter

    from gateway.edge import tracing  # deferred: imports gateway.models (Django set up)
    from gateway.edge.proxy import ProxyApp  # deferred: imports gateway.models (Django set up)

    check_production_auth()
    check_store_url()
    tracing.setup()  # once per process: off, ProxyApp is mounted as it is (SPEC §22)
    mapping: dict[str, Any] = {
        "http": HttpDispatcher(tracing.wrap(ProxyApp()), django_app),
        "websocket": websocket_application(),
        "lifespan": Lifespan(),
    }
    return ProtocolTypeRouter(mapping)


__all__ = [
    "HTTP_PROTOCOL",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_COUNT",
    "HeadersTooLarge",
    "HttpDispatcher",
    "Lifespan",
    "build_application",
    "server_command",
]
