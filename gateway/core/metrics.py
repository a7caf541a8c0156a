"""The one place that knows Prometheus: code calls ``metrics.request(...)`` and friends.

With several worker processes set ``PROMETHEUS_MULTIPROC_DIR`` (an empty folder
shared by the workers, before they start); ``/metrics`` then shows the sum over
all of them (prometheus_client's multiprocess mode). Label values are bounded:
known intents and modules, status codes, a fixed set of /shub paths.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

from gateway.core.conf import SHUB_METRIC_PATHS

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SHUB_PATHS = SHUB_METRIC_PATHS

SHUB_REQUESTS = Counter(
    "shub_proxy_requests", "Requests proxied to shub", ["status", "path", "method"]
)
SHUB_LATENCY = Histogram(
    "shub_proxy_latency_ms", "Latency of /shub answers (ms)", buckets=(1, 5, 10, 50, 100, 500)
)
CACHE_HIT_RATE = Gauge(
    "cache_hit_rate", "Health cache hits, percent of lookups", multiprocess_mode="livemostrecent"
)
CACHE_LOOKUPS = Counter("vx11_cache_lookups", "Health cache lookups", ["result"])
RATE_LIMIT_REJECTIONS = Counter(
    "rate_limit_rejections",
    "Requests refused by rate limits (or that would be, in shadow mode)",
    ["scope"],
)
REQUESTS = Counter("vx11_requests", "Proxied requests", ["intent", "module", "status"])
UPSTREAM_LATENCY = Histogram(
    "vx11_upstream_latency_seconds",
    "Upstream answer time",
    ["module"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BREAKER_STATE = Gauge(
    "vx11_circuit_breaker_state",
    "0 closed, 1 half-open, 2 open",
    ["module"],
    multiprocess_mode="mostrecent",
)
BREAKER_TRANSITIONS = Counter(
    "vx11_circuit_breaker_transitions", "Breaker transitions", ["module", "to"]
)
RETRIES = Counter("vx11_retries", "Retried upstream attempts", ["module"])
BACKPRESSURE_REJECTIONS = Counter(
    "vx11_backpressure_rejections", "Requests shed or timed out waiting", ["priority"]
)
INFLIGHT = Gauge("vx11_inflight_requests", "Upstream calls in flight", multiprocess_mode="livesum")
CONTEXT7_ACTIVE = Gauge(
    "vx11_context7_sessions_active", "Unexpired Context-7 sessions", multiprocess_mode="mostrecent"
)
MODULE_UP = Gauge(
    "vx11_module_up",
    "1 when the module's last health probe passed",
    ["module"],
    multiprocess_mode="mostrecent",
)
# --- streamed answers (SPEC §20) ----------------------------------------------------
#: Seconds to hours: a first token in 50 ms … a generation of an hour.
_STREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
STREAM_FIRST_BYTE = Histogram(
    "vx11_stream_first_byte_seconds",
    "Streaming routes: from the request to the module's first body byte",
    ["module"],
    buckets=_STREAM_BUCKETS,
)
STREAM_DURATION = Histogram(
    "vx11_stream_duration_seconds",
    "Streaming routes: from the answer's head to the stream's end (any end)",
    ["module"],
    buckets=_STREAM_BUCKETS,
)
STREAM_CUTS = Counter(
    "vx11_stream_cuts", "Streams the gateway cut", ["module", "reason"]
)  # reason: idle | max_duration


def stream_first_byte(module: str, seconds: float) -> None:
    _child(STREAM_FIRST_BYTE, module).observe(seconds)


def stream_end(module: str, seconds: float, cut: str | None) -> None:
    _child(STREAM_DURATION, module).observe(seconds)
    if cut is not None:
        _child(STREAM_CUTS, module, cut).inc()


# --- bulkheads (SPEC §10) -----------------------------------------------------------
MODULE_INFLIGHT = Gauge(
    "vx11_module_inflight",
    "Upstream calls in flight per module with a max_concurrent cap (its bulkhead)",
    ["module"],
    multiprocess_mode="livesum",
)


def module_inflight(module: str, value: int) -> None:
    """The module's bulkhead holders now (set when a slot is taken or given back)."""
    _child(MODULE_INFLIGHT, module).set(value)


# --- fallback chains (SPEC §19) -----------------------------------------------------
FALLBACKS = Counter(
    "vx11_fallbacks",
    "Requests moved from one option of a route's fallback chain to the next",
    ["intent", "from_module", "to_module", "reason"],
)  # reason: circuit_open | overloaded | unavailable | timeout | 5xx | 429


def fallback(intent: str, from_module: str, to_module: str, reason: str) -> None:
    _child(FALLBACKS, intent, from_module, to_module, reason).inc()


def fallbacks_taken() -> dict[tuple[str, str], float]:
    """This process's hops by ``(intent, to_module)``, every reason summed (the dashboard)."""
    taken: dict[tuple[str, str], float] = {}
    for family in FALLBACKS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["intent"], sample.labels["to_module"])
                taken[key] = taken.get(key, 0.0) + sample.value
    return taken


# --- tracing (SPEC §22) -------------------------------------------------------------
TRACE_SPANS_DROPPED = Counter(
    "vx11_tracing_spans_dropped",
    "Finished spans never exported: the export queue was full, or the collector failed",
    ["reason"],
)  # reason: queue_full | export_failed


def trace_spans_dropped(reason: str, count: int = 1) -> None:
    """Called from the exporting thread too (prometheus_client's values are thread-safe)."""
    _child(TRACE_SPANS_DROPPED, reason).inc(count)


# --- module pools: per-target requests and ejections (SPEC §12, §18) ------------------
TARGET_REQUESTS = Counter(
    "vx11_target_requests",
    "Upstream attempts per target of a module (status: the answer's, or the gateway error's)",
    ["module", "target", "status"],
)
TARGET_EJECTIONS = Counter(
    "vx11_target_ejections",
    "Outlier ejections that began, per target (counted once over every process)",
    ["module", "target"],
)


def target_request(module: str, target: str, status: int | str) -> None:
    """One attempt to ``target`` (``host:port``) of ``module`` ended with ``status``."""
    _child(TARGET_REQUESTS, module, target, str(status)).inc()


def target_ejected(module: str, target: str) -> None:
    _child(TARGET_EJECTIONS, module, target).inc()


# --- active health per target (SPEC §12, §18) ---------------------------------------
TARGET_UP = Gauge(
    "vx11_target_up",
    "1 when the target's last health probe passed (set by the worker, re-read at scrape)",
    ["module", "target"],
    multiprocess_mode="mostrecent",
)


def target_up(module: str, target: str, up: bool) -> None:
    TARGET_UP.labels(module, target).set(1 if up else 0)  # not memoised: targets_up clears


def targets_up(found: dict[tuple[str, str], bool]) -> None:
    """Every target's gauge at once (scrape time): a removed target's series goes away."""
    TARGET_UP.clear()
    for (module, target), up in found.items():
        target_up(module, target, up)


STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


def shub_path(path: str) -> str:
    return path if path in _SHUB_PATHS else "/shub/*"


def method_label(method: str) -> str:
    return method if method in _METHODS else "OTHER"


_children: dict[tuple[str, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(...)`` memoised: label values are bounded, lookups are per request."""
    key = (metric._name, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def request(intent: str, module: str, status: int, seconds: float | None) -> None:
    _child(REQUESTS, intent, module, str(status)).inc()
    if seconds is not None:
        _child(UPSTREAM_LATENCY, module).observe(seconds)


def shub_request(path: str, method: str, status: int, seconds: float) -> None:
    SHUB_REQUESTS.labels(str(status), shub_path(path), method_label(method)).inc()
    SHUB_LATENCY.observe(seconds * 1000.0)


def cache_lookup(hit: bool, hits: int, misses: int) -> None:
    CACHE_LOOKUPS.labels("hit" if hit else "miss").inc()
    total = hits + misses
    if total:
        CACHE_HIT_RATE.set(100.0 * hits / total)


def rate_limited(scope: str) -> None:
    RATE_LIMIT_REJECTIONS.labels(scope).inc()


def breaker_state(module: str, state: str) -> None:
    BREAKER_STATE.labels(module).set(STATE_VALUE.get(state, 0))


def breaker_transition(module: str, to_state: str) -> None:
    BREAKER_TRANSITIONS.labels(module, to_state).inc()
    breaker_state(module, to_state)


def retry(module: str) -> None:
    RETRIES.labels(module).inc()


def shed(priority: str) -> None:
    BACKPRESSURE_REJECTIONS.labels(priority).inc()


def module_up(module: str, up: bool) -> None:
    MODULE_UP.labels(module).set(1 if up else 0)


def context7_active(count: int) -> None:
    CONTEXT7_ACTIVE.set(count)


def exposition() -> bytes:
    """The scrape body: this process, or the sum of all workers in multiprocess mode."""
    if MULTIPROC:
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))
    from prometheus_client import REGISTRY

    return bytes(generate_latest(REGISTRY))
