"""Reading the client's request body: ``VX11_MAX_BODY_BYTES`` and the progress timeout.

The timeout (``VX11_CLIENT_BODY_TIMEOUT``) runs only while waiting for the client, on the
coarse per-loop timer of :mod:`gateway.edge.bodytimer`; a disconnect raises
:class:`ClientGone`. A refusal is remembered in ``call.body_error``: the upstream call
that was reading the body fails too, and the body's own error is the one answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.core.asgi import Message, Receive
from gateway.core.conf import gw
from gateway.core.problems import PayloadTooLarge, RequestTimeout
from gateway.edge import bodytimer
from gateway.edge.call import Call


class ClientGone(Exception):
    """The client disconnected before the gateway finished reading its request."""


async def read_body(call: Call, receive: Receive, first: bytes = b"") -> AsyncIterator[bytes]:
    """Stream the request body (after ``first``, already received), enforcing
    ``VX11_MAX_BODY_BYTES`` and ``VX11_CLIENT_BODY_TIMEOUT`` as it arrives.

    The timeout runs only while waiting for the client: a body message with at least
    one byte restarts it; the time the consumer (an upstream that reads slowly) takes
    between two chunks is not the client's.
    """
    limit = gw.max_body_bytes
    watch = bodytimer.waits()
    size = len(first)
    if first:
        yield first
    deadline = watch.deadline()
    while True:
        message = await _receive(call, receive, watch, deadline)
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            call.body_error = PayloadTooLarge(f"The request body exceeds {limit} bytes.")
            raise call.body_error
        if chunk:
            yield chunk
            deadline = watch.deadline()  # from now: the consumer's time is not the client's
        if not message.get("more_body", False):
            call.body_complete = True
            return


async def _receive(
    call: Call, receive: Receive, watch: bodytimer.BodyWaits, deadline: float
) -> Message:
    """One request-body message, waited for at most until ``deadline`` (408 after it);
    a disconnect raises ``ClientGone``."""
    task = asyncio.current_task()  # whichever task iterates: aiohttp's writer, or ours
    assert task is not None
    watch.waiting[task] = deadline
    if watch.handle is None:
        watch.arm()
    try:
        message = await receive()
    except asyncio.CancelledError:
        if watch.expired(task):
            raise _stalled(call) from None
        raise
    finally:
        watch.waiting.pop(task, None)
    if message["type"] == "http.disconnect":
        call.client_gone = True
        raise ClientGone()
    return message


def _stalled(call: Call) -> RequestTimeout:
    call.body_error = RequestTimeout(
        f"The request body made no progress for {gw.client_body_timeout:g} s."
    )
    return call.body_error


async def read_small(call: Call, receive: Receive) -> bytes | AsyncIterator[bytes]:
    """The body as bytes when it arrives in one message (the common small JSON case:
    cheaper to send than a stream), else a stream that starts with what was read."""
    watch = bodytimer.waits()
    first = await _receive(call, receive, watch, watch.deadline())
    chunk: bytes = first.get("body", b"")
    if len(chunk) > gw.max_body_bytes:
        call.body_error = PayloadTooLarge(f"The request body exceeds {gw.max_body_bytes} bytes.")
        raise call.body_error
    if not first.get("more_body", False):
        return chunk
    return read_body(call, receive, chunk)


async def read_all(call: Call, receive: Receive) -> bytes:
    parts = [chunk async for chunk in read_body(call, receive)]
    return b"".join(parts)
