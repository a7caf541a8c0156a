"""Builds the ASGI application and refuses to start when it would be unsafe."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from django.conf import settings

from gateway.core.asgi import Receive, Scope, Send
from gateway.core.conf import gw
from gateway.core.problems import InvalidRequest

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
    import multiprocessing
    import os
    import signal

    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        os.kill(parent.pid, signal.SIGTERM)


def check_production_auth() -> None:
    """Auth on, no token, DEBUG off: refuse to load (the server exits with the reason)."""
    if gw.auth_enabled and not gw.token and not settings.DEBUG:
        message = (
            "VX11 Gateway refuses to start: authentication is on but VX11_TOKEN is empty. "
            "Set VX11_TOKEN to one or more secret tokens (comma-separated), or "
            "VX11_AUTH_ENABLED=false for development only."
        )
        print(message, file=sys.stderr, flush=True)
        stop_supervisor()
        raise SystemExit(message)
    if not gw.auth_enabled:
        log.warning(
            "AUTHENTICATION IS DISABLED (VX11_AUTH_ENABLED=false): development only, "
            "every caller has operator rights"
        )


#: A request head (request line and headers) in bytes, and header lines, at most. The server
#: protocol (``gateway/edge/server.py``) answers 431 past either before buffering more and closes
#: the connection; the check in ``HttpDispatcher`` (names and values) is the second line, for
#: heads the protocol cannot measure exactly (pipelined in one read) and for servers run
#: without it (the in-process test server runs h11).
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 100


class HeadersTooLarge(InvalidRequest):
    """431; the code stays ``invalid_request`` (SPEC §2 has no code of its own for it)."""

    status, title = 431, "Request header fields too large"

    def __init__(self) -> None:
        super().__init__(
            f"The request head is larger than {MAX_HEADER_BYTES} bytes or has more than "
            f"{MAX_HEADER_COUNT} header fields."
        )


async def refuse_oversized_headers(send: Send) -> None:
    from gateway.core import correlation
    from gateway.core.asgi import send_bytes

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
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class Lifespan:
    """ASGI lifespan: the server's loop made known; pooled connections closed on shutdown.

    Breaker commands from other processes (no Redis) are applied on that loop, where the
    proxy's in-memory breakers and the events queue live (``gateway.operations.registry``).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from gateway.operations import registry as services
        from gateway.upstream import client as upstream

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                tune_gc()
                services.breaker_commands.serve_on(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                services.breaker_commands.serve_on(None)
                await upstream.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def websocket_application() -> Any:
    """``/ws/events`` (staff session cookie or admin token); other paths are refused."""
    from channels.auth import AuthMiddlewareStack
    from channels.routing import URLRouter
    from channels.security.websocket import WebsocketDenier
    from django.urls import path, re_path

    from gateway.console.consumers import EventsConsumer

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

    from gateway.edge.proxy import ProxyApp

    check_production_auth()
    mapping: dict[str, Any] = {
        "http": HttpDispatcher(ProxyApp(), django_app),
        "websocket": websocket_application(),
        "lifespan": Lifespan(),
    }
    return ProtocolTypeRouter(mapping)
