"""OpenTelemetry tracing (SPEC §22, §3; issue #17 item 3).

A real OTLP/HTTP receiver runs in the test process (``POST /v1/traces``, decoded with
opentelemetry-proto), a real gateway process exports to it (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_BSP_SCHEDULE_DELAY=50``) and a real upstream records the ``traceparent`` it got.
Spans are found by the request's correlation id (``vx11.correlation_id``).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import GATEWAY_TOKEN, MODULE_NAMES, OPERATOR_TOKEN
from tests.servers import ROOT, GatewayProcess, UpstreamServer, free_port, fresh_database_url

SERVER, CLIENT = 2, 3  # Span.SpanKind values in the OTLP protocol
OPERATOR = {"X-VX11-Token": OPERATOR_TOKEN}
SHUB = {"X-VX11-GW-Token": GATEWAY_TOKEN}
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any]
    status: int
    start_ns: int = 0
    end_ns: int = 0


@dataclass
class Collector:
    """An OTLP/HTTP traces receiver (protobuf), keeping every span it was sent."""

    port: int = field(default_factory=free_port)
    spans: list[Span] = field(default_factory=list)
    posts: int = 0

    def start(self) -> Collector:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                if self.path == "/v1/traces":
                    collector.take(raw)
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def take(self, raw: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(raw)
        self.posts += 1
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(
                            s.name,
                            s.kind,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            {a.key: _value(a.value) for a in s.attributes},
                            [
                                (e.name, {a.key: _value(a.value) for a in e.attributes})
                                for e in s.events
                            ],
                            resource,
                            s.status.code,
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                        )
                    )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def request(self, cid: str, clients: int = 1, timeout: float = 10.0) -> tuple[Span, list[Span]]:
        """The server span of the request ``cid`` and its ``clients`` client spans (waited for)."""
        deadline = time.monotonic() + timeout
        while True:
            server = [
                s
                for s in list(self.spans)
                if s.kind == SERVER and s.attributes.get("vx11.correlation_id") == cid
            ]
            children = (
                sorted(
                    (s for s in list(self.spans) if s.parent_id == server[0].span_id),
                    key=lambda s: s.attributes.get("vx11.attempt", 0),
                )
                if server
                else []
            )
            if (server and len(children) >= clients) or time.monotonic() > deadline:
                assert server, f"no server span for {cid}"
                return server[0], children
            time.sleep(0.02)


def gateway_env(workdir: str, upstream: UpstreamServer, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": fresh_database_url(None, workdir),
        "VX11_VAR_DIR": workdir,
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "VX11_REDIS_URL": "",
        "VX11_LOG_LEVEL": "WARNING",
        "OTEL_SERVICE_NAME": "",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
        **{f"VX11_MODULE_{name.upper()}_URL": upstream.url for name in MODULE_NAMES},
        **extra,
    }


def create_client(env: dict[str, str], name: str, rate_limit: int) -> str:
    """``manage.py create_api_client``; its token (the last line of its output)."""
    out = subprocess.run(
        [sys.executable, "manage.py", "create_api_client", name, "--rate-limit", str(rate_limit)],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    server = Collector().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def traced(collector: Collector, upstream: UpstreamServer) -> Iterator[tuple[GatewayProcess, str]]:
    workdir = tempfile.mkdtemp(prefix="vx11-otel-")
    env = gateway_env(
        workdir,
        upstream,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    GatewayProcess.migrate(env)
    limited = create_client(env, "limited", 1)
    server = GatewayProcess(env).start()
    yield server, limited
    server.stop()


def tp(header: str) -> tuple[str, str, str]:
    version, trace_id, parent, flags = header.split("-")
    assert version == "00"
    return trace_id, parent, flags


def test_server_span_continues_the_incoming_trace_and_the_module_gets_the_client_span(
    traced: tuple[GatewayProcess, str], collector: Collector, upstream: UpstreamServer
) -> None:
    gateway, _ = traced
    cid = "otel-" + uuid.uuid4().hex
    answer = httpx.post(
        gateway.url + "/vx11/route/task",
        json={"x": 1},
        headers={
            **OPERATOR,
            "X-Correlation-ID": cid,
            "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01",
            "tracestate": "vendor=abc",
        },
    )
    assert answer.status_code == 200
    server, clients = collector.request(cid)
    assert server.name == "POST /vx11/route/{intent}"
    assert server.trace_id == PARENT_TRACE and server.parent_id == PARENT_SPAN
    assert server.resource["service.name"] == "vx11-gateway"
    attrs = server.attributes
    assert attrs["vx11.intent"] == "task"
    assert attrs["vx11.module"] == "switch"
    assert attrs["http.response.status_code"] == 200
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.path"] == "/vx11/route/task"
    assert attrs["http.route"] == "/vx11/route/{intent}"
    [client] = clients
    assert client.kind == CLIENT and client.trace_id == PARENT_TRACE
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == upstream.port
    assert client.attributes["vx11.attempt"] == 1
    assert client.attributes["http.response.status_code"] == 200
    seen = next(s for s in upstream.seen if s.headers.get("X-Correlation-ID") == cid)
    trace_id, parent, flags = tp(seen.headers["traceparent"])
    assert (trace_id, parent, flags) == (PARENT_TRACE, client.span_id, "01")
    assert seen.headers["tracestate"] == "vendor=abc"


def test_a_caller_that_does_not_sample_is_followed(
    traced: tuple[GatewayProcess, str], collector: Collector, upstream: UpstreamServer
) -> None:
    """parentbased_always_on (the default): the caller's "not sampled" decides; nothing is
    exported and the module still gets the trace, unsampled."""
    gateway, _ = traced
    cid = "otel-unsampled-" + uuid.uuid4().hex
    answer = httpx.post(
        gateway.url + "/vx11/route/task",
        json={},
        headers={
            **OPERATOR,
            "X-Correlation-ID": cid,
            "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-00",
        },
    )
    assert answer.status_code == 200
    seen = next(s for s in upstream.seen if s.headers.get("X-Correlation-ID") == cid)
    trace_id, parent, flags = tp(seen.headers["traceparent"])
    assert trace_id == PARENT_TRACE and parent != PARENT_SPAN and flags == "00"
    marker = "otel-marker-" + uuid.uuid4().hex  # a sampled request after it: exported in order
    httpx.post(
        gateway.url + "/vx11/route/task", json={}, headers={**OPERATOR, "X-Correlation-ID": marker}
    )
    collector.request(marker)
    assert not [
        s
        for s in collector.spans
        if s.trace_id == PARENT_TRACE and s.attributes.get("vx11.correlation_id") == cid
    ]


def test_a_retry_is_two_client_spans_and_a_retry_event(
    traced: tuple[GatewayProcess, str], collector: Collector, upstream: UpstreamServer
) -> None:
    gateway, _ = traced
    counts: dict[str, int] = {}

    async def flaky(request: web.Request) -> web.StreamResponse:
        key = request.headers["X-Correlation-ID"]
        counts[key] = counts.get(key, 0) + 1
        return web.json_response({"n": counts[key]}, status=503 if counts[key] == 1 else 200)

    paths = ("/flaky", "/shub/flaky")  # with or without VX11_SHUB_STRIP_PREFIX
    for path in paths:
        upstream.route("GET", path, flaky)
    try:
        cid = "otel-retry-" + uuid.uuid4().hex
        answer = httpx.get(gateway.url + "/shub/flaky", headers={**SHUB, "X-Correlation-ID": cid})
    finally:
        for path in paths:
            upstream.handlers.pop(("GET", path), None)
    assert answer.status_code == 200 and answer.headers["x-vx11-attempts"] == "2"
    server, clients = collector.request(cid, clients=2)
    assert [c.attributes["vx11.attempt"] for c in clients] == [1, 2]
    assert [c.attributes["http.response.status_code"] for c in clients] == [503, 200]
    retries = [attrs for name, attrs in server.events if name == "vx11.retry"]
    assert len(retries) == 1 and retries[0]["attempt"] == 1 and retries[0]["module"] == "shub"
    # Each attempt carried its own span's context: the forwarded header is replaced.
    got = [
        tp(s.headers["traceparent"])[1]
        for s in upstream.seen
        if s.headers.get("X-Correlation-ID") == cid
    ]
    assert got == [c.span_id for c in clients]
    assert server.parent_id == "" and {c.trace_id for c in clients} == {server.trace_id}


def test_a_breaker_refusal_is_a_span_event(
    traced: tuple[GatewayProcess, str], collector: Collector
) -> None:
    gateway, _ = traced
    url = gateway.url + "/vx11/circuit-breaker/hermes"
    assert httpx.post(url, json={"action": "force_open"}, headers=OPERATOR).status_code == 200
    try:
        cid = "otel-open-" + uuid.uuid4().hex
        answer = httpx.post(
            gateway.url + "/vx11/route/audio",
            json={},
            headers={**OPERATOR, "X-Correlation-ID": cid},
        )
    finally:
        httpx.post(url, json={"action": "reset"}, headers=OPERATOR)
    assert answer.status_code == 503 and answer.json()["error"] == "circuit_open"
    server, clients = collector.request(cid, clients=0)
    assert clients == []
    [opened] = [attrs for name, attrs in server.events if name == "vx11.circuit_open"]
    assert opened["module"] == "hermes"
    assert server.attributes["http.response.status_code"] == 503
    assert server.attributes["vx11.module"] == "hermes"
    assert server.status == 2  # STATUS_CODE_ERROR: a 5xx answer


def test_a_rate_limit_refusal_is_a_span_event(
    traced: tuple[GatewayProcess, str], collector: Collector
) -> None:
    gateway, limited = traced
    cids = ["otel-rl-" + uuid.uuid4().hex for _ in range(2)]
    statuses = [
        httpx.post(
            gateway.url + "/vx11/route/task",
            json={},
            headers={"X-VX11-Token": limited, "X-Correlation-ID": cid},
        ).status_code
        for cid in cids
    ]
    assert statuses == [200, 429]
    server, clients = collector.request(cids[1], clients=0)
    assert clients == []
    [refused] = [attrs for name, attrs in server.events if name == "vx11.rate_limited"]
    assert refused["scope"] == "token"
    assert server.attributes["http.response.status_code"] == 429
    assert server.status == 0  # a 4xx is not the server span's error
    first, _ = collector.request(cids[0])
    assert not [name for name, _ in first.events if name == "vx11.rate_limited"]


def test_an_invalid_traceparent_starts_a_new_trace(
    traced: tuple[GatewayProcess, str], collector: Collector, upstream: UpstreamServer
) -> None:
    gateway, _ = traced
    cid = "otel-bad-" + uuid.uuid4().hex
    answer = httpx.get(
        gateway.url + "/shub/anything",
        headers={**SHUB, "X-Correlation-ID": cid, "traceparent": f"00-{PARENT_TRACE}-zz-01"},
    )
    assert answer.status_code == 200
    server, [client] = collector.request(cid)
    assert server.name == "GET /shub/{path}"
    assert server.parent_id == "" and server.trace_id != PARENT_TRACE
    seen = next(s for s in upstream.seen if s.headers.get("X-Correlation-ID") == cid)
    trace_id, parent, flags = tp(seen.headers["traceparent"])
    assert (trace_id, parent) == (server.trace_id, client.span_id)
    assert int(flags, 16) & 1  # sampled (the SDK also sets W3C level 2's "random" bit, 0x02)


def _slow_stream(chunks: int, pause: float) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        answer = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await answer.prepare(request)
        try:
            for i in range(chunks):
                await answer.write(f"chunk {i}\n".encode())
                await asyncio.sleep(pause)
            await answer.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        return answer

    return handler


def test_the_server_span_of_a_stream_ends_with_its_last_chunk(
    traced: tuple[GatewayProcess, str], collector: Collector, upstream: UpstreamServer
) -> None:
    gateway, _ = traced
    upstream.route("POST", "/switch/task", _slow_stream(5, 0.1), read_body=False)
    try:
        cid = "otel-stream-" + uuid.uuid4().hex
        with httpx.stream(
            "POST",
            gateway.url + "/vx11/route/stream",
            json={},
            headers={**OPERATOR, "X-Correlation-ID": cid},
        ) as answer:
            body = b"".join(answer.iter_bytes())
    finally:
        upstream.handlers.pop(("POST", "/switch/task"), None)
    assert answer.status_code == 200 and body.count(b"chunk") == 5
    server, [client] = collector.request(cid)
    assert server.attributes["http.response.status_code"] == 200
    assert "vx11.client_closed" not in server.attributes and server.status == 0
    # The client span ends with the answer's head, the server span after the last chunk.
    assert (server.end_ns - server.start_ns) / 1e9 >= 0.4  # five chunks, 0.1 s apart
    assert client.end_ns < server.end_ns - 0.3e9


def test_a_client_that_leaves_mid_stream_ends_the_server_span(
    traced: tuple[GatewayProcess, str], collector: Collector, upstream: UpstreamServer
) -> None:
    gateway, _ = traced
    upstream.route("POST", "/switch/task", _slow_stream(100, 0.05), read_body=False)
    try:
        cid = "otel-left-" + uuid.uuid4().hex
        with httpx.stream(
            "POST",
            gateway.url + "/vx11/route/stream",
            json={},
            headers={**OPERATOR, "X-Correlation-ID": cid},
        ) as answer:
            first = next(answer.iter_bytes())
        assert answer.status_code == 200 and first.startswith(b"chunk 0")
        server, _ = collector.request(cid)  # ended well before the upstream's 5 s
    finally:
        upstream.handlers.pop(("POST", "/switch/task"), None)
    assert server.attributes["vx11.client_closed"] is True
    assert server.attributes["http.response.status_code"] == 200
    assert (server.end_ns - server.start_ns) / 1e9 < 3


def test_a_dead_collector_never_slows_or_fails_a_request(upstream: UpstreamServer) -> None:
    workdir = tempfile.mkdtemp(prefix="vx11-otel-dead-")
    env = gateway_env(
        workdir,
        upstream,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing listens
        OTEL_BSP_SCHEDULE_DELAY="50",
        VX11_LOG_LEVEL="INFO",
    )
    GatewayProcess.migrate(env)
    gateway = GatewayProcess(env).start()
    try:
        started = time.monotonic()
        with httpx.Client(base_url=gateway.url, headers=OPERATOR, timeout=10) as client:
            statuses = [
                client.post("/vx11/route/task", json={"i": i}).status_code for i in range(50)
            ]
        elapsed = time.monotonic() - started
        assert statuses == [200] * 50
        assert elapsed < 20, elapsed  # a sanity bound only: 50 local requests take well under 1 s

        def dropped() -> float:
            text = httpx.get(gateway.url + "/metrics").text
            for line in text.splitlines():
                if line.startswith('vx11_tracing_spans_dropped_total{reason="export_failed"}'):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        deadline = time.monotonic() + 15
        while dropped() == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dropped() > 0  # the lost spans are counted
    finally:
        gateway.stop()
    output = gateway.output()
    assert "Traceback" not in output
    complaints = [line for line in output.splitlines() if "export" in line.lower()]
    assert len(complaints) < 10, complaints  # per message and minute, not per request or batch


def test_tracing_off_is_decided_once_and_leaves_traceparent_alone(
    http: httpx.Client, upstream: UpstreamServer, operator_headers: dict[str, str]
) -> None:
    from gateway.edge import tracing
    from gateway.edge.proxy import ProxyApp
    from vx11site.asgi import application

    assert not tracing.enabled
    assert type(application.application_mapping["http"].proxy) is ProxyApp  # mounted unwrapped
    good = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    http.post("/vx11/route/task", json={}, headers={**operator_headers, "traceparent": good})
    assert upstream.seen[-1].headers["traceparent"] == good  # passed on, not replaced
    http.post("/vx11/route/task", json={}, headers=operator_headers)
    assert "traceparent" not in {k.lower() for k in upstream.seen[-1].headers}


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_which_environment_turns_tracing_on(env: dict[str, str], wanted: bool) -> None:
    from gateway.edge import tracing

    assert tracing.wanted(env) is wanted


def test_spans_that_do_not_fit_the_queue_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's queue drops the oldest span when full; each drop is counted."""
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from prometheus_client import REGISTRY

    from gateway.edge.otel_export import CountedBatch

    class Stuck(SpanExporter):  # a collector that takes its time with the first batch
        def __init__(self) -> None:
            self.entered, self.release = threading.Event(), threading.Event()

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.entered.set()
            self.release.wait(10)
            return SpanExportResult.SUCCESS

    def count() -> float:
        labels = {"reason": "queue_full"}
        return REGISTRY.get_sample_value("vx11_tracing_spans_dropped_total", labels) or 0.0

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    exporter = Stuck()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(CountedBatch(exporter))
    tracer = provider.get_tracer("test")
    before = count()
    for _ in range(4):  # a full batch: the exporting thread takes it and is stuck with it
        tracer.start_span("a").end()
    assert exporter.entered.wait(5)
    for _ in range(7):  # 4 fit the queue again, 3 do not
        tracer.start_span("b").end()
    assert count() - before == 3
    exporter.release.set()
    provider.shutdown()
