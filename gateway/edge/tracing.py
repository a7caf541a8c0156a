"""Tracing of the proxy path (SPEC §22 "OpenTelemetry", §3): decided once, at start-up.

:func:`setup` (called by ``gateway.startup.build_application`` in every worker process)
turns tracing on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set — unless ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` — by loading :mod:`gateway.edge.otel` (the OpenTelemetry SDK
and the OTLP/HTTP exporter) and rebinding this module's request-path functions to it.
Otherwise nothing of OpenTelemetry is even imported: the proxy application is mounted
unwrapped (:func:`wrap` returns it as it is), the upstream step tests ``tracing.enabled``
(one module attribute) before it would call :func:`send`, and :func:`event` stays a
function that does nothing.

What the request path calls (all of it only matters when ``enabled``):

- :func:`wrap` — the server span of every proxied request (startup);
- :func:`annotate` — the call's intent, module and correlation id on that span
  (``gateway.edge.pipeline``);
- :func:`send` — one client span per upstream attempt around ``gateway.upstream.send``,
  whose context goes to the module in ``traceparent`` (``gateway.edge.exchange``);
- :func:`event` — a span event on the request's span: ``vx11.rate_limited``,
  ``vx11.circuit_open``, ``vx11.retry``, ``vx11.fallback``, ``vx11.ejection``; a cheap
  no-op when tracing is off or no span is current. Guard calls with
  ``if tracing.enabled:`` so that the off path does not even build the keyword arguments.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType
from typing import Protocol

from gateway.core.asgi import Receive, Scope, Send
from gateway.edge.call import Call
from gateway.upstream import OutboundRequest, UpstreamResponse

App = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Any of these set (non-empty) turns tracing on (SPEC §22).
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

#: Whether this process traces: set once by :func:`setup`, never changed afterwards.
enabled = False

_otel: ModuleType | None = None


class EventFunction(Protocol):
    def __call__(self, name: str, /, **attributes: str | int | float | bool | None) -> None: ...


def _no_event(name: str, /, **attributes: str | int | float | bool | None) -> None:
    """Tracing off: nothing to record."""


def _no_annotation(call: Call) -> None:
    """Tracing off: nothing to record."""


def _untraced_send(call: Call, outbound: OutboundRequest) -> Awaitable[UpstreamResponse]:
    raise RuntimeError("tracing.send called with tracing off: test tracing.enabled first")


#: ``event(name, **attributes)``: an event on the current span (``None`` values left out).
event: EventFunction = _no_event
#: ``annotate(call)``: the routed call's intent, module and correlation id on the server span.
annotate: Callable[[Call], None] = _no_annotation
#: ``send(call, outbound)``: ``gateway.upstream.send`` inside a client span (tracing on only).
send: Callable[[Call, OutboundRequest], Awaitable[UpstreamResponse]] = _untraced_send


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (the standard OpenTelemetry variables)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def setup(env: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on if the environment asks for it (once per process); ``enabled``."""
    global enabled, event, annotate, send, _otel
    if _otel is None and wanted(env):
        from gateway.edge import otel  # deferred: the SDK loads only when tracing is on

        otel.start()
        _otel = otel
        event, annotate, send = otel.event, otel.annotate, otel.client_send
        enabled = True
    return enabled


def wrap(app: App) -> App:
    """``app`` with a server span around each request; ``app`` itself when tracing is off."""
    if _otel is None:
        return app
    traced: App = _otel.ServerSpans(app)
    return traced


async def shutdown() -> None:
    """Export what is still queued, for a bounded time (lifespan shutdown)."""
    if _otel is not None:
        await _otel.shutdown()


__all__ = [
    "ENDPOINT_VARIABLES",
    "annotate",
    "enabled",
    "event",
    "send",
    "setup",
    "shutdown",
    "wanted",
    "wrap",
]
