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
