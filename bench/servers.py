"""Processes the benchmark measures: a fast upstream and a bare aiohttp reverse proxy.

Run as ``python -m bench.servers upstream PORT`` or ``... proxy PORT UPSTREAM_URL``.
Both run on uvloop, like the gateway, so the comparison is of the request path only.
"""

from __future__ import annotations

import socket
import sys

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

PAYLOAD = b'{"module":"switch","response":"ok","tokens":[1,2,3,4,5,6,7,8]}'


def _listening(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


def upstream(port: int, *more: int) -> None:
    """The module: a fixed JSON answer. ``more``: further ports of the same process (the
    targets of one module pool in ``bench.ab --targets N``, one upstream's CPU for all)."""
    peers: set[object] = set()  # (ip, port) of every connection that sent a request

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if request.transport is not None:
            peers.add(request.transport.get_extra_info("peername"))
        return web.Response(body=PAYLOAD, content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        """``GET /_bench/connections``: connections that sent requests so far (keep-alive
        reuse shows as a small number)."""
        return web.json_response({"connections": len(peers)})

    app = web.Application()
    app.router.add_get("/_bench/connections", stats)
    app.router.add_route("*", "/{tail:.*}", answer)
    if more:
        socks = [_listening(p) for p in (port, *more)]
        web.run_app(app, sock=socks, access_log=None, print=None, loop=uvloop.new_event_loop())
        return
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


def proxy(port: int, target: str) -> None:
    """The reference: a bare aiohttp reverse proxy with a pooled client, nothing else."""

    async def make_session(app: web.Application) -> None:
        app["client"] = ClientSession(
            connector=TCPConnector(limit=512),
            auto_decompress=False,
            timeout=ClientTimeout(total=30),
        )

    async def close_session(app: web.Application) -> None:
        await app["client"].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with request.app["client"].request(
            "POST",
            target + "/switch/route-v5",
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as upstream_response:
            data = await upstream_response.read()
            return web.Response(
                body=data,
                status=upstream_response.status,
                content_type=upstream_response.content_type,
            )

    app = web.Application()
    app.on_startup.append(make_session)
    app.on_cleanup.append(close_session)
    app.router.add_post("/vx11/route/{intent}", forward)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


def collector(port: int) -> None:
    """An OTLP/HTTP traces receiver that reads each export and discards it (200, empty
    ``ExportTraceServiceResponse``): the far end of a tracing gateway under load."""

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/v1/traces", accept)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "upstream":
        upstream(*(int(p) for p in sys.argv[2:]))
    elif kind == "proxy":
        proxy(int(sys.argv[2]), sys.argv[3])
    elif kind == "collector":
        collector(int(sys.argv[2]))
    else:
        raise SystemExit(
            "usage: python -m bench.servers upstream PORT [PORT…] | proxy PORT URL | collector PORT"
        )
