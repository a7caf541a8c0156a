"""``GET /metrics`` through the live gateway (SPEC §12), the alert rules, several workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GATEWAY_TOKEN, OPERATOR_TOKEN, wait_until
from tests.servers import GatewayProcess, fresh_database_url

OP = {"X-VX11-Token": OPERATOR_TOKEN}
GW = {"X-VX11-GW-Token": GATEWAY_TOKEN}
ROOT = Path(__file__).resolve().parents[2]

SPEC_METRICS = [
    "shub_proxy_requests_total",
    "shub_proxy_latency_ms",
    "cache_hit_rate",
    "rate_limit_rejections_total",
    "vx11_requests_total",
    "vx11_upstream_latency_seconds",
    "vx11_circuit_breaker_state",
    "vx11_circuit_breaker_transitions_total",
    "vx11_retries_total",
    "vx11_backpressure_rejections_total",
    "vx11_inflight_requests",
    "vx11_context7_sessions_active",
    "vx11_module_up",
    "vx11_fallbacks_total",
    "vx11_stream_first_byte_seconds",
    "vx11_stream_duration_seconds",
]


class Scrape:
    """One parsed /metrics answer: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.families: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                self.samples[key] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.samples.items() if n == name)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(lbls)[label] for (n, lbls), _ in self.samples.items() if n == name}

    @property
    def sample_names(self) -> set[str]:
        return {name for name, _ in self.samples}


def scrape(client: httpx.Client, base: str = "") -> Scrape:
    r = client.get(base + "/metrics")
    assert r.status_code == 200, r.text
    return Scrape(r.text)


# --------------------------------------------------------------------------- the endpoint


def test_metrics_answer_prometheus_text_without_credentials(http):
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE vx11_requests_total counter" in r.text
    # A wrong token is ignored, not refused.
    assert http.get("/metrics", headers={"X-VX11-Token": "wrong"}).status_code == 200


def test_every_spec_metric_is_exposed(http, upstream):
    http.post("/vx11/route/task", json={}, headers=OP)
    http.get("/shub/health")
    families = Scrape(http.get("/metrics").text).families
    for name in SPEC_METRICS:
        base = name.removesuffix("_total")
        assert name in families or base in families, name
    assert families["shub_proxy_latency_ms"] == "histogram"
    assert families["vx11_upstream_latency_seconds"] == "histogram"
    assert families["cache_hit_rate"] == "gauge"


def test_django_prometheus_metrics_are_included(http):
    http.get("/health")
    text = http.get("/metrics").text
    assert "django_http_requests_total_by_method_total" in text
    assert "django_http_responses_total_by_status_total" in text


def test_metrics_can_be_turned_off(http, gw_env):
    gw_env.set(VX11_METRICS_ENABLED="false")
    r = http.get("/metrics")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["error"] == "not_found"


def test_allow_list_refuses_other_addresses(http, gw_env):
    gw_env.set(VX11_METRICS_ALLOWED_IPS="10.0.0.0/8, 192.168.0.0/16")
    r = http.get("/metrics")
    assert r.status_code == 403
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["error"] == "forbidden"
    assert "vx11_requests" not in r.text
    gw_env.set(VX11_METRICS_ALLOWED_IPS="10.0.0.0/8,127.0.0.0/8")
    assert http.get("/metrics").status_code == 200


def test_a_malformed_allow_list_refuses_everyone(http, gw_env):
    gw_env.set(VX11_METRICS_ALLOWED_IPS="127.0.0.0/8,not-a-network")
    r = http.get("/metrics")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


def test_allow_list_sees_the_client_behind_a_trusted_proxy(http, gw_env):
    gw_env.set(VX11_METRICS_ALLOWED_IPS="10.0.0.0/8", VX11_TRUSTED_PROXIES="127.0.0.0/8")
    assert http.get("/metrics", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200
    assert http.get("/metrics", headers={"X-Forwarded-For": "8.8.8.8"}).status_code == 403


# --------------------------------------------------------------------------- moving metrics


def test_request_counters_and_latency_move_with_traffic(http, upstream):
    before = scrape(http)
    for _ in range(3):
        assert http.post("/vx11/route/task", json={}, headers=OP).status_code == 200
    assert http.get("/shub/files/1", headers=GW).status_code == 200
    assert http.post("/shub/files", json={}, headers=GW).status_code == 200
    after = scrape(http)
    ok = {"intent": "task", "module": "switch", "status": "200"}
    assert after.value("vx11_requests_total", **ok) == before.value("vx11_requests_total", **ok) + 3
    count = "vx11_upstream_latency_seconds_count"
    assert after.value(count, module="switch") == before.value(count, module="switch") + 3
    assert after.value("vx11_upstream_latency_seconds_sum", module="switch") > before.value(
        "vx11_upstream_latency_seconds_sum", module="switch"
    )
    shub_get = {"status": "200", "path": "/shub/*", "method": "GET"}
    shub_post = {**shub_get, "method": "POST"}
    for labels in (shub_get, shub_post):
        assert after.value("shub_proxy_requests_total", **labels) == (
            before.value("shub_proxy_requests_total", **labels) + 1
        )
    assert (
        after.value("shub_proxy_latency_ms_count")
        == before.value("shub_proxy_latency_ms_count") + 2
    )
    buckets = {
        dict(lbls)["le"] for (n, lbls) in after.samples if n == "shub_proxy_latency_ms_bucket"
    }
    assert buckets == {"1.0", "5.0", "10.0", "50.0", "100.0", "500.0", "+Inf"}


def test_refusals_are_counted_with_their_status(http, upstream):
    before = scrape(http)
    assert http.post("/vx11/route/task", json={}).status_code == 401
    assert http.get("/shub/files/1").status_code == 401
    after = scrape(http)
    # Refused before its route was resolved: the bounded "unknown" intent.
    labels = {"intent": "unknown", "module": "none", "status": "401"}
    assert after.value("vx11_requests_total", **labels) == (
        before.value("vx11_requests_total", **labels) + 1
    )
    shub = {"status": "401", "path": "/shub/*", "method": "GET"}
    assert after.value("shub_proxy_requests_total", **shub) == (
        before.value("shub_proxy_requests_total", **shub) + 1
    )


def test_cache_hit_rate_is_the_share_of_hits(http, upstream):
    http.get("/shub/health")  # miss
    assert scrape(http).value("cache_hit_rate") == 0.0
    http.get("/shub/health")  # hit
    assert scrape(http).value("cache_hit_rate") == 50.0
    http.get("/shub/health")
    http.get("/shub/health")
    assert scrape(http).value("cache_hit_rate") == 75.0


def test_rate_limit_rejections_are_counted_per_scope(http, gw_env):
    before = scrape(http)
    gw_env.set(VX11_RATE_LIMIT_TOKEN=1)
    http.post("/vx11/route/task", json={}, headers=OP)
    assert http.post("/vx11/route/task", json={}, headers=OP).json()["scope"] == "token"
    gw_env.set(VX11_RATE_LIMIT_TOKEN=100, VX11_RATE_LIMIT_PROTECTED=1)
    http.get("/shub/files/1", headers=GW)
    assert http.get("/shub/files/1", headers=GW).json()["scope"] == "protected"
    gw_env.set(VX11_RATE_LIMIT_PROTECTED=100, VX11_RATE_LIMIT_IP=1)
    http.get("/shub/health")
    assert http.get("/shub/health").json()["scope"] == "ip"
    after = scrape(http)
    for scope in ("token", "protected", "ip"):
        assert after.value("rate_limit_rejections_total", scope=scope) == (
            before.value("rate_limit_rejections_total", scope=scope) + 1
        ), scope
    assert after.value("vx11_requests_total", intent="task", module="switch", status="429") == (
        before.value("vx11_requests_total", intent="task", module="switch", status="429") + 1
    )


def test_breaker_state_and_transitions_follow_the_breaker(http, upstream, gw_env):
    gw_env.set(VX11_CB_FAILURE_THRESHOLD=3)
    before = scrape(http)
    assert before.value("vx11_circuit_breaker_state", module="switch") == 0
    upstream.respond("POST", "/switch/task", status=500)
    for _ in range(3):
        http.post("/vx11/route/task", json={}, headers=OP)
    assert http.post("/vx11/route/task", json={}, headers=OP).json()["error"] == "circuit_open"
    after = scrape(http)
    assert after.value("vx11_circuit_breaker_state", module="switch") == 2
    assert after.value("vx11_circuit_breaker_state", module="madre") == 0
    opened = {"module": "switch", "to": "open"}
    assert after.value("vx11_circuit_breaker_transitions_total", **opened) == (
        before.value("vx11_circuit_breaker_transitions_total", **opened) + 1
    )
    # Every module has a state sample, refreshed at scrape time.
    assert {"switch", "madre", "shub", "hermes"} <= after.label_values(
        "vx11_circuit_breaker_state", "module"
    )
    r = http.post("/vx11/circuit-breaker/switch", json={"action": "reset"}, headers=OP)
    if r.status_code == 200:  # the breaker API (another team's) reports the reset here too
        assert scrape(http).value("vx11_circuit_breaker_state", module="switch") == 0


def test_retries_are_counted_per_module(http, upstream):
    calls = {"n": 0}

    async def flaky(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return web.json_response({"busy": True}, status=503)
        return web.json_response({"ok": True})

    upstream.route("GET", "/flaky", flaky)
    before = scrape(http)
    r = http.get("/shub/flaky", headers=GW)
    assert r.status_code == 200 and r.headers["x-vx11-attempts"] == "2"
    after = scrape(http)
    assert after.value("vx11_retries_total", module="shub") == (
        before.value("vx11_retries_total", module="shub") + 1
    )


@pytest.fixture
def slow_call(http, upstream) -> Iterator[Any]:
    """Starts one slow /shub call in a thread; yields once the upstream is answering it."""
    release = threading.Event()

    async def slow(request: web.Request) -> web.Response:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return web.json_response({"slow": True})

    upstream.route("GET", "/slow", slow)
    answers: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(http.get("/shub/slow", headers=GW)), daemon=True
    )

    class Handle:
        def start(self) -> None:
            thread.start()
            assert wait_until(lambda: any(s.path == "/slow" for s in upstream.seen))

        def finish(self) -> httpx.Response:
            release.set()
            thread.join(10)
            return answers[0]

    handle = Handle()
    yield handle
    release.set()


def test_inflight_gauge_counts_calls_in_progress(http, gateway, slow_call):
    with httpx.Client(base_url=gateway.url, timeout=10) as other:
        assert scrape(other).value("vx11_inflight_requests") == 0
        slow_call.start()
        assert scrape(other).value("vx11_inflight_requests") == 1
        assert slow_call.finish().status_code == 200
        assert scrape(other).value("vx11_inflight_requests") == 0


def test_backpressure_rejections_are_counted_per_priority(gateway, gw_env, slow_call):
    gw_env.set(VX11_MAX_INFLIGHT=1, VX11_QUEUE_MAX=0)
    with httpx.Client(base_url=gateway.url, timeout=10) as other:
        before = scrape(other)
        slow_call.start()
        r = other.get("/shub/files/1", headers=GW)
        assert r.status_code == 503 and r.json()["error"] == "service_overloaded"
        assert slow_call.finish().status_code == 200
        after = scrape(other)
    assert after.value("vx11_backpressure_rejections_total", priority="other") == (
        before.value("vx11_backpressure_rejections_total", priority="other") + 1
    )


def test_context7_gauge_counts_unexpired_sessions(http, upstream):
    from sessions_ctx7.models import Session

    for sid in ("metrics-a", "metrics-b"):
        r = http.post("/vx11/route/chat", json={"message": "hi", "session_id": sid}, headers=OP)
        assert r.status_code == 200, r.text
    live = Session.objects.filter(expires_at__gt=timezone.now()).count()
    assert live >= 2
    assert scrape(http).value("vx11_context7_sessions_active") == live
    Session.objects.filter(session_id="metrics-a").update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert scrape(http).value("vx11_context7_sessions_active") == live - 1


def test_module_up_follows_the_stored_health(http):
    from gateway.models import ModuleHealth

    health = ModuleHealth.objects.create(module="hermes", status="down")
    assert scrape(http).value("vx11_module_up", module="hermes") == 0
    health.status = "up"
    health.save()
    assert scrape(http).value("vx11_module_up", module="hermes") == 1


# --------------------------------------------------------------------------- bounded labels


def test_unknown_intents_share_one_label_value(http, upstream):
    names = [f"nosuch{i}" for i in range(5)]
    before = scrape(http)
    for name in names:
        assert http.post(f"/vx11/route/{name}", json={}, headers=OP).status_code == 404
    after = scrape(http)
    intents = after.label_values("vx11_requests_total", "intent")
    assert not intents & set(names)
    labels = {"intent": "unknown", "module": "none", "status": "404"}
    assert after.value("vx11_requests_total", **labels) == (
        before.value("vx11_requests_total", **labels) + 5
    )
    for name in names:
        assert name not in after.text


def test_shub_paths_collapse_to_one_label(http, upstream):
    paths = [f"/shub/users/{i}/files/f{i}.txt" for i in range(5)]
    for path in paths:
        http.get(path, headers=GW)
    http.request("BREW", "/shub/pot", headers=GW)
    after = scrape(http)
    assert after.label_values("shub_proxy_requests_total", "path") <= {
        "/shub/*",
        "/shub/health",
        "/shub/ready",
        "/shub/openapi.json",
        "/shub/cache/clear",
    }
    assert after.label_values("shub_proxy_requests_total", "method") <= {
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "OPTIONS",
        "OTHER",
    }
    assert "users/" not in after.text and "f1.txt" not in after.text


# --------------------------------------------------------------------------- alert rules

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}


def expr_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers that are not functions or keywords."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("("):
            continue  # a function
        if match.group(0) not in PROMQL_KEYWORDS:
            names.add(match.group(0))
    return names


def test_expr_metric_names_reads_names_only():
    assert expr_metric_names(
        'histogram_quantile(0.99, sum by (module, le) (rate(a_bucket{x="y"}[5m]))) > 0.1 and b'
    ) == {"a_bucket", "b"}


def load_alerts() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docs/prometheus/alerts.yml").read_text())
    return doc


def test_alert_rules_are_well_formed():
    doc = load_alerts()
    assert set(doc) == {"groups"} and doc["groups"]
    alerts: list[str] = []
    for group in doc["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            alerts.append(rule["alert"])
    assert len(alerts) == len(set(alerts))
    exprs = {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}
    # The four the SPEC asks for.
    assert "histogram_quantile(0.99" in exprs["VX11UpstreamLatencyHigh"]
    assert "> 0.1" in exprs["VX11UpstreamLatencyHigh"]
    assert "> 0.01" in exprs["VX11ErrorRateHigh"]
    assert "vx11_circuit_breaker_state" in exprs["VX11CircuitBreakerOpen"]
    assert "== 2" in exprs["VX11CircuitBreakerOpen"]
    assert "vx11_module_up" in exprs["VX11ModuleDown"] and "== 0" in exprs["VX11ModuleDown"]
    # SPEC §18: a module running degraded (some targets down), and one target down long.
    assert "min by (module) (vx11_target_up) == 0" in exprs["VX11ModuleDegraded"]
    assert "max by (module) (vx11_target_up) == 1" in exprs["VX11ModuleDegraded"]
    assert "vx11_target_up" in exprs["VX11TargetDownLong"]


def test_every_metric_an_alert_reads_is_in_the_exposition(http, upstream, gw_env):
    from gateway.models import ModuleHealth
    from gateway.operations.probes import save_target_health

    ModuleHealth.objects.create(module="shub", status="up")
    health = {"status": "down", "latency_ms": None, "last_check": 1.0}
    save_target_health("shub", {"127.0.0.1:9": {**health, "consecutive_failures": 1}})
    gw_env.set(VX11_MAX_INFLIGHT=1, VX11_QUEUE_MAX=0, VX11_CB_FAILURE_THRESHOLD=1)
    http.post("/vx11/route/task", json={}, headers=OP)
    http.get("/shub/files/1", headers=GW)
    upstream.respond("POST", "/madre/task", status=500)
    http.post("/vx11/route/analysis", json={}, headers=OP)  # opens madre's breaker
    http.post("/vx11/route/stream", json={}, headers=OP)  # the stream histograms (SPEC §20)
    result = scrape(http)
    known = set(result.sample_names)
    used: set[str] = set()
    for group in load_alerts()["groups"]:
        for rule in group["rules"]:
            used |= expr_metric_names(rule["expr"])
    # Shed requests only appear once something was shed; the family is declared anyway.
    declared = {name + "_total" for name, kind in result.families.items() if kind == "counter"}
    missing = {name for name in used if name not in known and name not in declared}
    assert not missing, missing
    assert used >= {
        "vx11_upstream_latency_seconds_bucket",
        "vx11_requests_total",
        "vx11_circuit_breaker_state",
        "vx11_module_up",
        "vx11_target_up",
    }


# --------------------------------------------------------------------------- several workers


def requests_per_pid(folder: str) -> dict[str, float]:
    """``vx11_requests`` as each worker's own file holds it (prometheus_client's format)."""
    from prometheus_client.mmap_dict import MmapedDict

    found: dict[str, float] = {}
    for path in Path(folder).glob("counter_*.db"):
        pid = path.stem.split("_")[-1]
        for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[0] == "vx11_requests":
                found[pid] = found.get(pid, 0.0) + value
    return found


@pytest.mark.reliability
def test_two_workers_are_summed_in_one_scrape(upstream):
    workdir = tempfile.mkdtemp(prefix="vx11-metrics-")
    prom_dir = tempfile.mkdtemp(prefix="vx11-prom-")
    env = {
        "DATABASE_URL": fresh_database_url(os.environ.get("DATABASE_URL"), workdir),
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_VAR_DIR": workdir,
        "VX11_MODULE_SWITCH_URL": upstream.url,
        "PROMETHEUS_MULTIPROC_DIR": prom_dir,
    }
    GatewayProcess.migrate({k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
    gateway = GatewayProcess(env, workers=2).start()
    try:
        sent = 0

        async def batch(size: int) -> None:
            limits = httpx.Limits(max_keepalive_connections=0)  # new connection each
            async with httpx.AsyncClient(timeout=10, limits=limits) as client:
                answers = await asyncio.gather(
                    *(
                        client.post(gateway.url + "/vx11/route/task", json={}, headers=OP)
                        for _ in range(size)
                    )
                )
            assert all(r.status_code == 200 for r in answers)

        for _ in range(20):  # until both workers have answered some (the kernel picks)
            asyncio.run(batch(10))
            sent += 10
            if len(requests_per_pid(prom_dir)) >= 2:
                break
        per_pid = requests_per_pid(prom_dir)
        assert len(per_pid) == 2 and all(v > 0 for v in per_pid.values()), per_pid
        assert sum(per_pid.values()) == sent
        with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            for _ in range(6):  # whichever worker answers the scrape
                result = scrape(c, gateway.url)
                assert result.total("vx11_requests_total") == sent
                ok = {"intent": "task", "module": "switch", "status": "200"}
                assert result.value("vx11_requests_total", **ok) == sent
    finally:
        gateway.stop()
