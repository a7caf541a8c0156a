"""A streaming route's body loop: idle timeout, max duration and SSE heartbeats (SPEC §20).

For routes with ``streaming`` on, the route's ``timeout`` bounds only the wait for the
answer's head (``OutboundRequest.head_only``); the body is then bounded here, as Envoy
bounds it (``stream_idle_timeout``, ``max_stream_duration``):

- ``idle_timeout``: the longest wait for the module's next chunk;
- ``max_duration``: the whole stream, from its head;
- ``VX11_SSE_HEARTBEAT_SECONDS``: an SSE answer that has sent nothing for that long gets a
  comment line ``: keep-alive`` — only at an event boundary (the bytes sent so far end
  with a blank line), never inside an event.

A cut stream ends visibly: an SSE answer gets an ``event: vx11-error`` whose ``data`` is
the ``upstream_timeout`` problem JSON, then its clean end; any other answer is aborted
(:class:`StreamCut` propagates, no last chunk is written).

**One timer per stream, re-armed lazily.** A chunk costs two float stores (``quiet`` and
``sent``), no timer handle: the one ``loop.call_at`` handle fires at the earliest moment
something *could* be due, finds out what is (usually nothing: data came meanwhile), and
re-arms itself for the new earliest moment. With 1 event/s and a 15 s heartbeat that is
one timer callback per stream every ≈ 15 s. When something is due the callback cancels
the streaming task (as ``asyncio.timeout`` does) and the loop, seeing the reason, sends
the heartbeat and waits again (``UpstreamResponse.next_chunk`` may be cancelled and called
again) or cuts the stream.

The idle clock runs only while the loop waits for the module: time spent writing to a
slow client is not the module's silence. The max duration counts wherever the loop is.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import orjson

from gateway.core import metrics
from gateway.core.asgi import Send
from gateway.core.conf import gw
from gateway.core.problems import UpstreamTimeout
from gateway.edge.call import Call
from gateway.upstream import UpstreamResponse

HEARTBEAT = b": keep-alive\n\n"
#: The ends of a blank line: the bytes sent so far end an SSE event.
_BOUNDARY = (b"\n\n", b"\r\n\r\n", b"\r\r")
IDLE, MAX_DURATION, _BEAT = "idle", "max_duration", "heartbeat"
_NEVER = float("inf")


class StreamCut(UpstreamTimeout):
    """The gateway cut a stream that is not SSE: its body is aborted (no last chunk)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Watch(Protocol):
    """The client watch of ``gateway.edge.answer`` (set before the last send)."""

    done: bool


class StreamTimer:
    """The one timer of one stream (see the module's doc)."""

    __slots__ = (
        "at_boundary",
        "beat",
        "end",
        "fired",
        "handle",
        "idle",
        "loop",
        "quiet",
        "sent",
        "task",
        "waiting",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[object],
        idle: float,
        max_duration: float,
        beat: float,
    ) -> None:
        now = loop.time()
        self.loop, self.task = loop, task
        self.idle, self.beat = idle, beat or _NEVER
        self.end = now + max_duration
        self.quiet = self.sent = now  # the wait for the module began / last bytes out
        self.waiting = False
        self.at_boundary = True  # nothing sent yet: a heartbeat may go first
        self.fired: str | None = None
        self.handle: asyncio.TimerHandle | None = loop.call_at(self._next(now), self._fire)

    def _next(self, now: float) -> float:
        """The earliest moment something may be due (never later than it is)."""
        if self.waiting:
            due = self.quiet + self.idle
            beat = self.sent + self.beat if self.at_boundary else now + self.beat
        else:  # writing to the client: the next wait starts later than now
            due, beat = now + self.idle, now + self.beat
        return min(due, beat, self.end)

    def _fire(self) -> None:
        now = self.loop.time()
        reason = None
        if now >= self.end:
            reason = MAX_DURATION
        elif self.waiting and now >= self.quiet + self.idle:
            reason = IDLE
        elif self.waiting and self.at_boundary and now >= self.sent + self.beat:
            reason = _BEAT
        if reason is None:
            self.handle = self.loop.call_at(self._next(now), self._fire)
            return
        self.handle = None
        self.fired = reason
        self.task.cancel()

    def taken(self) -> str | None:
        """After ``CancelledError``: the reason when the cancel was this timer's (then
        taken back, and the timer re-armed); ``None``: someone else's, let it propagate."""
        reason = self.fired
        if reason is None:
            return None
        self.fired = None
        if self.task.uncancel() > 0:  # cancelled by someone else as well (client gone)
            return None
        if reason == _BEAT:
            self.handle = self.loop.call_at(self._next(self.loop.time()), self._fire)
        return reason

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def _boundary(tail: bytes, chunk: bytes) -> tuple[bytes, bool]:
    """The stream's last bytes after ``chunk``, and whether they end an event."""
    tail = chunk[-4:] if len(chunk) >= 4 else (tail + chunk)[-4:]  # never the whole chunk
    return tail, tail.endswith(_BOUNDARY)


def error_event(call: Call, reason: str, tail: bytes, at_boundary: bool) -> bytes:
    """The ``event: vx11-error`` that ends a cut SSE stream; an event in progress is
    ended first (its line, then a blank line) so the error is parsed on its own."""
    problem = UpstreamTimeout(_detail(call, reason))
    data = orjson.dumps(problem.body(call.request.cid))
    # After "\n" one more ends the event; after "\r" a "\n" would only complete a CRLF.
    lead = b"" if at_boundary else b"\n" if tail.endswith(b"\n") else b"\n\n"
    return lead + b"event: vx11-error\ndata: " + data + b"\n\n"


def _detail(call: Call, reason: str) -> str:
    route = call.route
    assert route is not None
    if reason == IDLE:
        return f"The module sent nothing for {route.idle_timeout:g} s (the route's idle_timeout)."
    return f"The stream reached the route's max_duration of {route.max_duration:g} s."


async def pump(
    call: Call,
    response: UpstreamResponse,
    send: Send,
    watch: Watch | None,
    headers: list[tuple[bytes, bytes]],
) -> str | None:
    """Write a streaming route's answer: head, chunks, last chunk. Returns ``None`` when
    the module ended it, else why the gateway cut it (:data:`IDLE`, :data:`MAX_DURATION`:
    an SSE answer got its error event and its clean end); a cut of another answer raises
    :class:`StreamCut`. The stream's metrics are recorded however it ends."""
    route = call.route
    assert route is not None
    sse = (response.header("Content-Type") or "").lower().startswith("text/event-stream")
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    head_at = time.monotonic()
    task = asyncio.current_task()
    assert task is not None
    timer = StreamTimer(
        asyncio.get_running_loop(),
        task,
        float(route.idle_timeout),
        float(route.max_duration),
        gw.sse_heartbeat_seconds if sse else 0.0,
    )
    cut: str | None = None
    try:
        cut = await _loop(call, response, send, timer, sse)
        timer.stop()  # no cancel may land in the last send
        if watch is not None:
            watch.done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except StreamCut as exc:
        cut = exc.reason
        raise
    finally:
        timer.stop()
        metrics.stream_end(call.module.name, time.monotonic() - head_at, cut)
    return cut


async def _loop(
    call: Call, response: UpstreamResponse, send: Send, timer: StreamTimer, sse: bool
) -> str | None:
    """Chunks until the end (``None``) or a cut of an SSE answer (its reason: the error
    event was sent); any other cut raises :class:`StreamCut`."""
    loop = timer.loop
    first = True
    beat = False  # a heartbeat is due: written inside the ``try``, where a cut is caught
    tail = b"\n\n"
    next_chunk = response.next_chunk
    while True:
        try:
            if beat:
                beat = False
                await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                timer.sent = loop.time()
            timer.waiting = True
            chunk = await next_chunk()
            timer.waiting = False
            if chunk is None:
                return None
            if first:
                first = False
                started = call.deadline - float(call.route.timeout)  # type: ignore[union-attr]
                metrics.stream_first_byte(call.module.name, time.monotonic() - started)
            if sse:
                tail, timer.at_boundary = _boundary(tail, chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            timer.quiet = timer.sent = loop.time()  # the next wait for the module begins
        except asyncio.CancelledError:
            was_waiting, timer.waiting = timer.waiting, False
            reason = timer.taken()
            if reason is None:
                raise
            if reason == _BEAT:
                beat = True
                continue
            if not (sse and was_waiting):  # not SSE, or stuck writing to a slow client
                raise StreamCut(reason, _detail(call, reason)) from None
            event = error_event(call, reason, tail, timer.at_boundary)
            await send({"type": "http.response.body", "body": event, "more_body": True})
            return reason


__all__ = ["HEARTBEAT", "IDLE", "MAX_DURATION", "StreamCut", "StreamTimer", "error_event", "pump"]
