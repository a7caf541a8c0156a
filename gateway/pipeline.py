"""The request pipeline shared by every proxied call.

    auth (proxy.build_call) → rate limit → backpressure → [breaker → upstream]×attempts → record

Each step is a plain async function over a :class:`~gateway.proxy.Call`; the
policies themselves (breaker, limiter, queue, budget) live in
``gateway.policies`` and are reached through :mod:`gateway.services`.
"""

from __future__ import annotations

import time

from gateway import upstream
from gateway.asgi_util import Receive, Send
from gateway.proxy import Call, declared_length, read_body, response_headers
from gateway.upstream import Body, UpstreamResponse


def has_body(call: Call) -> bool:
    length = declared_length(call.scope)
    if length is not None:
        return length > 0
    return any(k == b"transfer-encoding" for k, _ in call.scope["headers"])


async def handle(call: Call, receive: Receive, send: Send) -> None:
    body: Body = read_body(call, receive) if has_body(call) else None
    response = await forward(call, body)
    await stream_response(call, response, send)


async def forward(call: Call, body: Body) -> UpstreamResponse:
    """One upstream exchange through the policies; the answer is not read yet."""
    headers = call.upstream_headers()
    if isinstance(body, bytes):
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    call.attempts += 1
    remaining = call.deadline - time.monotonic()
    return await upstream.send(
        call.method, call.url, headers, body, max(remaining, 0.001), unavailable=call.unavailable
    )


async def stream_response(call: Call, response: UpstreamResponse, send: Send) -> None:
    finished = False
    try:
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": response_headers(call, response.headers),
            }
        )
        async for chunk in response.iter_chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        finished = True
        response.release()
    finally:
        if not finished:
            response.close()
