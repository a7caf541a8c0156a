"""The OpenTelemetry side of :mod:`gateway.edge.tracing`, loaded only when tracing is on.

- :func:`start`, :func:`shutdown`: the provider, its batch processor and the OTLP/HTTP
  exporter (``gateway.edge.otel_export``: export off the request path, bounded, counted).
- :class:`ServerSpans`: the server span of a proxied request, named and attributed as the
  contrib ASGI instrumentation does (``POST /vx11/route/{intent}``,
  ``http.request.method``, ``url.path``, ``http.route``, ``http.response.status_code``…),
  continuing a valid incoming ``traceparent`` (the same test as the one that forwards it,
  ``gateway.core.correlation.valid_traceparent``; an invalid one starts a new trace). It
  ends when the application returns: after the last byte of a streamed answer, or when the
  client left (``vx11.client_closed``).
- :func:`client_send`: one client span per upstream attempt (``server.address``,
  ``server.port``, ``vx11.attempt``), whose context replaces ``traceparent`` (and
  ``tracestate``) in the attempt's headers. It covers the attempt up to the answer's head
  (what retries and the breaker decide on); the body's time is the server span's.
- :func:`event`, :func:`annotate`: on the current (server) span.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from opentelemetry import context, trace
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from gateway.core import correlation
from gateway.core.asgi import Message, Receive, Scope, Send
from gateway.edge import otel_export
from gateway.edge.call import Call
from gateway.upstream import OutboundRequest, UpstreamResponse
from gateway.upstream import send as upstream_send

INTENT_PREFIX = "/vx11/route/"
INTENT_ROUTE = "/vx11/route/{intent}"
SHUB_ROUTE = "/shub/{path}"
#: Known methods (semantic conventions); any other is ``_OTHER``, its span named ``HTTP``.
METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
_ROOT = context.Context()  # a server span's parent when the request carries no valid one

_tracer: trace.Tracer = trace.NoOpTracer()


# --------------------------------------------------------------------------- set-up


def start() -> None:
    """The provider and exporter (``gateway.edge.otel_export``); this module's tracer."""
    global _tracer
    _tracer = otel_export.start()


shutdown = otel_export.shutdown


# --------------------------------------------------------------------------- server span


def remote_parent(headers: Iterable[tuple[bytes, bytes]]) -> context.Context:
    """The context of a valid incoming ``traceparent`` (and ``tracestate``), else none."""
    traceparent = tracestate = None
    for name, value in headers:
        if name == b"traceparent":
            traceparent = value.decode("latin-1")
        elif name == b"tracestate":
            tracestate = value.decode("latin-1")
    if traceparent is None or not correlation.valid_traceparent(traceparent):
        return _ROOT
    _, trace_id, span_id, flags = traceparent.split("-")
    state = (
        TraceState.from_header([tracestate])
        if tracestate is not None and correlation.valid_tracestate(tracestate)
        else None
    )
    parent = SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
        trace_state=state,
    )
    return trace.set_span_in_context(NonRecordingSpan(parent), _ROOT)


def _server_attributes(scope: Scope, method: str, route: str) -> dict[str, str]:
    attributes = {
        "http.request.method": method,
        "url.path": scope["path"],
        "url.scheme": str(scope.get("scheme", "http")),
        "http.route": route,
        "network.protocol.version": str(scope.get("http_version", "1.1")),
        "client.address": (scope.get("client") or ("",))[0],
    }
    if method == "_OTHER":
        attributes["http.request.method_original"] = scope["method"]
    return attributes


class ServerSpans:
    """ASGI middleware: one SERVER span per proxied request, current while it is handled."""

    __slots__ = ("app",)

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"] if scope["method"] in METHODS else "_OTHER"
        route = INTENT_ROUTE if scope["path"].startswith(INTENT_PREFIX) else SHUB_ROUTE
        span = _tracer.start_span(
            f"{method if method != '_OTHER' else 'HTTP'} {route}",
            context=remote_parent(scope.get("headers", ())),
            kind=SpanKind.SERVER,
            attributes=_server_attributes(scope, method, route),
        )
        token = context.attach(trace.set_span_in_context(span))
        exchange = _Exchange(span, receive, send)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except BaseException as exc:  # cancelled, or a bug past the proxy's own handler
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            exchange.finish()
            context.detach(token)
            span.end()


class _Exchange:
    """Watches the ASGI messages of one request: the status sent, whether the answer was
    complete, whether the client left first."""

    __slots__ = ("_receive", "_send", "client_left", "complete", "span", "status")

    def __init__(self, span: trace.Span, receive: Receive, send: Send) -> None:
        self.span = span
        self._receive = receive
        self._send = send
        self.status = 0
        self.complete = False
        self.client_left = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.span.set_attribute("vx11.correlation_id", correlation.current.get())
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.complete:
            self.client_left = True
        return message

    def finish(self) -> None:
        span, status = self.span, self.status
        if status:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        if self.client_left:
            span.set_attribute("vx11.client_closed", True)
        elif status and not self.complete:  # the answer broke off mid-body
            span.set_attribute("error.type", "answer_incomplete")
            span.set_status(Status(StatusCode.ERROR, "answer incomplete"))


def annotate(call: Call) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("vx11.module", call.module.name)
        span.set_attribute("vx11.correlation_id", call.request.cid)
        if call.route is not None:
            span.set_attribute("vx11.intent", call.route.intent)


def event(name: str, /, **attributes: str | int | float | bool | None) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, {k: v for k, v in attributes.items() if v is not None})


# --------------------------------------------------------------------------- client spans

_ADDRESSES: dict[str, tuple[str, int]] = {}


def address(origin: str) -> tuple[str, int]:
    """``server.address`` and ``server.port`` of a module's origin URL (memoised)."""
    found = _ADDRESSES.get(origin)
    if found is None:
        parts = urlsplit(origin)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if len(_ADDRESSES) > 256:
            _ADDRESSES.clear()
        found = _ADDRESSES[origin] = (parts.hostname or "", port)
    return found


def propagated(headers: list[tuple[str, str]], span: SpanContext) -> list[tuple[str, str]]:
    """``headers`` with ``traceparent``/``tracestate`` naming ``span`` (the forwarded ones
    replaced: ``gateway.upstream.hop`` writes them lower-case)."""
    out = [kv for kv in headers if kv[0] != "traceparent" and kv[0] != "tracestate"]
    out.append(
        ("traceparent", f"00-{span.trace_id:032x}-{span.span_id:016x}-{span.trace_flags:02x}")
    )
    if span.trace_state:
        out.append(("tracestate", span.trace_state.to_header()))
    return out


async def client_send(call: Call, outbound: OutboundRequest) -> UpstreamResponse:
    """``gateway.upstream.send`` for one attempt, inside its CLIENT span."""
    module = call.module
    origin = call.chosen.url if call.chosen is not None else None
    server = trace.get_current_span()
    if not server.is_recording():  # not sampled: the module gets that (unsampled) context
        unsampled = server.get_span_context()
        if unsampled.is_valid:
            outbound.headers = propagated(outbound.headers, unsampled)
        return await upstream_send(module, outbound, origin=origin)
    server.set_attribute("vx11.module", module.name)  # the last attempt's
    host, port = address(origin or module.url)  # the chosen target (SPEC §18, §22)
    method = outbound.method if outbound.method in METHODS else "_OTHER"
    span = _tracer.start_span(
        method if method != "_OTHER" else "HTTP",
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": method,
            "server.address": host,
            "server.port": port,
            "vx11.module": module.name,
            "vx11.attempt": call.attempts,
            "vx11.target": call.chosen.key if call.chosen is not None else "",
        },
    )
    outbound.headers = propagated(outbound.headers, span.get_span_context())
    try:
        response = await upstream_send(module, outbound, origin=origin)
    except BaseException as exc:
        code = getattr(exc, "code", None)
        kind = code if isinstance(code, str) else type(exc).__qualname__
        span.set_attribute("error.type", kind)
        span.set_status(Status(StatusCode.ERROR, kind))
        span.end()
        raise
    span.set_attribute("http.response.status_code", response.status)
    if response.status >= 400:
        span.set_attribute("error.type", str(response.status))
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    return response


__all__ = [
    "ServerSpans",
    "annotate",
    "client_send",
    "event",
    "propagated",
    "remote_parent",
    "shutdown",
    "start",
]
