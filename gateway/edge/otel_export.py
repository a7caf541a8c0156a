"""The export side of tracing (``gateway.edge.otel``): provider, batch processor, exporter.

Loaded only when tracing is on. A ``TracerProvider`` (``service.name`` from
``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES``, else ``vx11-gateway``; the sampler
from ``OTEL_TRACES_SAMPLER``/``_ARG``, the SDK's default ``parentbased_always_on``) with the
SDK's ``BatchSpanProcessor`` over the OTLP/HTTP exporter: spans are exported by the
processor's own thread, never on the request path. A dead collector costs the request path
nothing: the queue is bounded (``OTEL_BSP_MAX_QUEUE_SIZE``, 2048), what does not fit or fails
to export is counted (``vx11_tracing_spans_dropped_total{reason}``), one export takes at most
2 s unless ``OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`` says otherwise (the SDK's own default is
10 s), and the exporter's complaints are logged once a minute per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from gateway.core import metrics

log = logging.getLogger("gateway.tracing")

DEFAULT_SERVICE_NAME = "vx11-gateway"
#: Seconds one export may take when no ``OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`` is set.
DEFAULT_EXPORT_TIMEOUT = 2.0
TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
#: Seconds the lifespan shutdown waits for the last spans to go out.
SHUTDOWN_SECONDS = 3.0
#: The exporter's and the processor's loggers: one line per message and minute.
SDK_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
)

_provider: TracerProvider | None = None


def queue_size() -> int:
    """``OTEL_BSP_MAX_QUEUE_SIZE`` (the SDK's default 2048 when unset or not a positive number)."""
    try:
        size = int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") or 2048)
    except ValueError:
        return 2048
    return size if size > 0 else 2048


class CountedBatch(BatchSpanProcessor):
    """The SDK's batch processor, with its drops counted.

    The SDK's queue is a bounded deque that drops the oldest span when full; this keeps a
    count of what is queued (ended here, taken by the exporting thread) to count each drop.
    """

    def __init__(self, exporter: SpanExporter) -> None:
        self.capacity = queue_size()
        self.queued = 0
        self.lock = threading.Lock()
        super().__init__(_CountedExport(exporter, self), max_queue_size=self.capacity)

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        with self.lock:
            full = self.queued >= self.capacity
            if not full:
                self.queued += 1
        if full:
            metrics.trace_spans_dropped("queue_full")
        super().on_end(span)

    def taken(self, count: int) -> None:
        with self.lock:
            self.queued = max(0, self.queued - count)


class _CountedExport(SpanExporter):
    """The exporter, telling the processor what left its queue and counting failed batches."""

    def __init__(self, exporter: SpanExporter, processor: CountedBatch) -> None:
        self.exporter = exporter
        self.processor = processor

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.processor.taken(len(spans))
        result = self.exporter.export(spans)
        if result is not SpanExportResult.SUCCESS:
            metrics.trace_spans_dropped("export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class OncePerMinute(logging.Filter):
    """Lets a logger's same message through once per ``seconds`` (a dead collector would
    otherwise log every batch and every retry)."""

    def __init__(self, seconds: float = 60.0) -> None:
        super().__init__()
        self.seconds = seconds
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = str(record.msg), time.monotonic()
        if now - self.last.get(key, -math.inf) < self.seconds:
            return False
        if len(self.last) > 256:
            self.last.clear()
        self.last[key] = now
        return True


def resource() -> Resource:
    found = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(found.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        found = found.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return found


def start() -> trace.Tracer:
    """The provider (made the global one), its batch processor and exporter; the tracer."""
    global _provider
    explicit = any(os.environ.get(name, "").strip() for name in TIMEOUT_VARIABLES)
    exporter = OTLPSpanExporter(timeout=None if explicit else DEFAULT_EXPORT_TIMEOUT)
    # shutdown_on_exit=False: an atexit flush would hold a stopping worker for up to 30 s
    # when the collector is down; the lifespan's :func:`shutdown` bounds it instead.
    provider = TracerProvider(resource=resource(), shutdown_on_exit=False)
    provider.add_span_processor(CountedBatch(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    quiet = OncePerMinute()
    for name in SDK_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    log.info(
        "tracing on: OTLP/HTTP to %s",
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
    )
    return provider.get_tracer("gateway.edge.tracing")


async def shutdown() -> None:
    """Flush and stop the provider on a thread of its own, waited for at most
    :data:`SHUTDOWN_SECONDS` (a thread of the loop's executor would hold the process's exit)."""
    provider = _provider
    if provider is None:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def stop() -> None:
        try:
            provider.shutdown()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(finished)

    threading.Thread(target=stop, name="vx11-tracing-shutdown", daemon=True).start()
    try:
        await asyncio.wait_for(done, SHUTDOWN_SECONDS)
    except TimeoutError:
        log.warning("tracing: spans still queued at shutdown were not exported")


__all__ = ["CountedBatch", "OncePerMinute", "queue_size", "resource", "shutdown", "start"]
