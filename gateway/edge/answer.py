"""Reading the module's answer, writing it to the client, and the attempt's one outcome.

``exchange.forward`` returns the answer of the last attempt together with its breaker
permit, unrecorded. Whoever reads the body records the outcome once it is known:

- the body was read whole: the answer's status decides (:func:`settle` with
  ``broken=False``; for a clean closed breaker and a success that is no store call);
- the body broke off (cut short, broken chunk framing, a timeout): a failure, and the
  client sees a clean 502 if nothing was written yet (:func:`send_small`), else an
  aborted body (no last chunk; :func:`stream_response` lets the error propagate);
- the client left (or the task was cancelled): no outcome, the permit is given back (a
  half-open probe's slot is free at once): what a client does is never the module's
  failure — but a failure status (a 503 whose reader left) is still recorded;
- a streamed answer of a half-open probe is settled at its head, so the probe's lease is
  not held for the length of the stream;
- a streaming route's answer cut by the gateway (``gateway.edge.stream``, SPEC §20): an
  idle cut is the module's failure (it stalled: Envoy counts a stream idle timeout as a
  504 of the cluster), a ``max_duration`` cut is not (the stream was healthy; the route's
  policy ended it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from gateway.core.asgi import Message, Receive, Send
from gateway.core.problems import GatewayError
from gateway.edge.call import Call
from gateway.edge.headers import edge
from gateway.edge.stream import IDLE, StreamCut, pump
from gateway.edge.targets import counted, is_failure, outcome, report
from gateway.operations import registry as services
from gateway.policies.breaker import CLOSED, Permit
from gateway.upstream import UpstreamResponse, hop

#: Sized answers up to this many bytes are read whole and written in one message.
SMALL_ANSWER = 64 * 1024
_BODYLESS = (204, 304)  # statuses that never carry Content-Length downstream


class Downstream:
    """The client's side of the exchange: every ASGI message to it goes through here.

    Remembers the status sent (``0``: nothing yet, so a problem may still be answered)
    and keeps ``Content-Length`` off a 204 or 304.
    """

    __slots__ = ("send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            status = self.status = message["status"]
            if status in _BODYLESS:
                # RFC 9110 §8.6: a 204 never has Content-Length, a 304's describes the
                # representation; the ASGI server would expect that many body bytes
                # (uvicorn raises and resets the kept-alive client connection).
                message["headers"] = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"content-length"
                ]
        await self.send(message)


def response_headers(
    call: Call, upstream_headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The module's headers as the client gets them (``gateway.upstream.hop.answer_headers``:
    hop-by-hop and the gateway's own taken out), then the gateway's values."""
    out = hop.answer_headers(upstream_headers, edge().cookie_names)
    out.append((b"x-correlation-id", call.request.cid.encode()))
    if call.route is not None:
        out.append((b"x-vx11-intent", call.route.intent.encode()))
    out.append((b"x-vx11-module", call.module.name.encode()))
    if call.attempts:
        out.append((b"x-vx11-attempts", str(call.attempts).encode()))
    if call.chosen is not None:  # SPEC §18: the host:port that answered
        out.append((b"x-vx11-target", call.chosen.key.encode()))
    out.extend(call.response_headers)
    return out


async def settle(
    call: Call, svc: services.Services, response: UpstreamResponse, permit: Permit, broken: bool
) -> None:
    """Record the outcome of the attempt that produced ``response``, its body read.

    ``broken``: the body failed (cut short, broken framing, too slow): a failure for the
    module's breaker, unless the client's own upload caused it.
    """
    if broken and (call.client_gone or call.body_error is not None):
        await svc.breaker.release(call.module.name, permit)
        return
    await svc.breaker.record(
        call.module.name,
        status=response.status,
        error=broken,
        probe_id=permit.probe_id,
        permit=permit,
    )
    await outcome(call, svc, response.status, broken or is_failure(response.status))


async def read_answer(
    call: Call, svc: services.Services, response: UpstreamResponse, permit: Permit, limit: int
) -> bytes:
    """The whole body (at most ``limit`` bytes), the attempt's outcome recorded."""
    try:
        body = await response.read(limit)
    except GatewayError:
        response.close()
        await settle(call, svc, response, permit, True)
        raise
    except BaseException:
        response.close()
        await give_back(call, svc, response, permit)
        raise
    response.release()
    await settle(call, svc, response, permit, False)
    return body


async def give_back(
    call: Call, svc: services.Services, response: UpstreamResponse, permit: Permit
) -> None:
    """The answer was abandoned (the client left, or the task was cancelled) before its
    body was read: nothing is learnt about the module — unless its status already is a
    failure (a 503 whose reader left is still a 503), which is recorded."""
    breaker = svc.breaker
    if response.status in breaker.config_for(call.module.name).failure_statuses:
        await settle(call, svc, response, permit, False)
    else:
        await breaker.release(call.module.name, permit)


#: The permit of a streamed answer whose half-open probe was settled at its head: a
#: later break of the body is an ordinary failure, with no probe lease left to settle.
_SETTLED_AT_HEAD = Permit(True, CLOSED, 0.0)


class ClientDisconnected(ConnectionResetError):
    """The client hung up while its answer was being streamed."""


class ClientWatch:
    """Cancels the streaming task when the client hangs up.

    uvicorn drops ``send`` calls for a gone client silently, so without this a streamed
    answer would be read from the module to its end, holding the upstream connection
    and a backpressure slot for up to the route's timeout. The client's departure
    shows as ``http.disconnect`` on ``receive``, which may only be awaited once the
    request body has been read.
    """

    __slots__ = ("done", "fired", "task", "watcher")

    def __init__(self, receive: Receive) -> None:
        self.task = asyncio.current_task()
        self.done = False  # set before the last send: a finished answer reads as a disconnect
        self.fired = False
        self.watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.done and self.task is not None:
            self.fired = True
            self.task.cancel()

    def stop(self) -> None:
        self.watcher.cancel()


def _watch(
    call: Call, response: UpstreamResponse, receive: Receive | None, streaming: bool
) -> ClientWatch | None:
    """A watch over the client for answers that may run long (a task per request costs
    CPU): streaming routes and answers of unknown length (chunked, SSE). A sized answer is
    written out at once and uvicorn drops what a gone client no longer reads."""
    if (
        receive is not None
        and call.body_complete
        and (streaming or response.header("Content-Length") is None)
    ):
        return ClientWatch(receive)
    return None


async def stream_response(
    call: Call,
    response: UpstreamResponse,
    send: Send,
    receive: Receive | None,
    svc: services.Services,
    permit: Permit,
) -> None:
    """Write the answer; the attempt's breaker outcome is recorded at its end.

    A body that breaks off mid-stream is a failure for the breaker and the exception
    propagates: no final chunk is written, so the client sees an aborted body, never a
    complete one. A client that leaves gives the permit back without an outcome."""
    streaming = call.route is not None and call.route.streaming
    watch = _watch(call, response, receive, streaming)
    if watch is None and not streaming:
        size = response.content_length()
        if size is not None and size <= SMALL_ANSWER:
            await send_small(call, response, send, svc, permit)
            return
    settled = permit.probe_id is not None
    if settled:  # a half-open probe's lease (30 s) must not last a stream: its head decides
        await settle(call, svc, response, permit, False)
        permit = _SETTLED_AT_HEAD
    finished = False
    try:
        cut = await _write(call, response, send, watch, streaming)
        finished = True
        response.release() if cut is None else response.close()  # cut: not complete
    except GatewayError as exc:  # the body broke off, or a cut that is not SSE (StreamCut)
        if watch is not None:
            watch.done = True  # the outcome is recorded whatever the client does now
        response.close()
        finished = True
        broken = not isinstance(exc, StreamCut) or exc.reason == IDLE
        if broken or not settled:  # a probe settled at its head: only a break is news
            await settle(call, svc, response, permit, broken)
        raise
    except asyncio.CancelledError:
        left = watch is not None and watch.fired and watch.task is not None
        if left:
            assert watch is not None and watch.task is not None
            watch.task.uncancel()
            call.client_gone = True
        if not settled:
            await give_back(call, svc, response, permit)
        if not left:
            raise  # cancelled for another reason (shutdown): the permit was given back
        raise ClientDisconnected("the client disconnected during the answer") from None
    except BaseException:  # writing to a client that left (OSError)
        if not settled:
            await give_back(call, svc, response, permit)
        raise
    finally:
        if watch is not None:
            watch.stop()
        if not finished:
            response.close()  # closes the module's connection: its request is cancelled
    if not settled or cut == IDLE:  # an idle cut is news even after a probe's head
        await settle(call, svc, response, permit, cut == IDLE)


def _write(
    call: Call,
    response: UpstreamResponse,
    send: Send,
    watch: ClientWatch | None,
    streaming: bool,
) -> Coroutine[Any, Any, str | None]:
    """A streaming route's answer under its stream timers (``gateway.edge.stream``: why it
    was cut, or ``None``), any other answer of unknown size as it comes (``None``). Returns
    the coroutine itself: no extra frame per answer."""
    if streaming:
        return pump(call, response, send, watch, response_headers(call, response.headers))
    return _write_stream(call, response, send, watch)


async def _write_stream(
    call: Call, response: UpstreamResponse, send: Send, watch: ClientWatch | None
) -> None:
    """The head, every chunk as it comes, and the last (empty) chunk."""
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": response_headers(call, response.headers),
        }
    )
    async for chunk in response.iter_chunks():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    if watch is not None:
        watch.done = True
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def send_small(
    call: Call, response: UpstreamResponse, send: Send, svc: services.Services, permit: Permit
) -> None:
    """A sized answer of at most ``SMALL_ANSWER`` bytes: read whole, then written at once.

    Cheaper than streaming (two ASGI messages instead of three, no async iteration), and
    an answer that breaks off is a clean 502 instead of a truncated 200. The outcome is
    recorded once, after the body was read.
    """
    try:
        body = await response.read_sized()
    except GatewayError:
        response.close()
        await settle(call, svc, response, permit, True)
        raise
    except BaseException:
        response.close()
        await give_back(call, svc, response, permit)
        raise
    response.release()
    await svc.breaker.record(  # settle(..., False), inline: the common path
        call.module.name,
        status=response.status,
        error=False,
        probe_id=permit.probe_id,
        permit=permit,
    )
    failure = is_failure(response.status)
    pool = counted(call, svc, response.status, failure)
    if pool is not None:
        await report(call, svc, pool, failure)
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": response_headers(call, response.headers),
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_buffered(
    call: Call, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    out = [(k, v) for k, v in response_headers(call, headers) if k != b"content-length"]
    out.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})
