"""Small ASGI helpers for the lean handlers (no Django request/response objects)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def header(scope: Scope, name: bytes) -> str | None:
    """First value of a request header (``name`` lower-case bytes).

    The one helper for a lookup in an ASGI scope (the WebSocket consumers use it); the
    proxy path reads every header it needs in one pass instead
    (``gateway.edge.headers.RequestHead``).
    """
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def send_bytes(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_bytes(
        send,
        status,
        [(b"content-type", b"application/json"), *(headers or [])],
        orjson.dumps(payload),
    )
