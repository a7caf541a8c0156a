"""Gateway knobs (``VX11_*``), read lazily from the environment.

Like DRF's ``APISettings``: nothing is read at import time; the first access
reads every knob once, ``reload()`` re-reads them (tests call it after changing
the environment). Each knob is declared once, as a typed attribute of
:class:`GatewaySettings` with its default and meaning (``gw.retry_max`` is an
``int`` to mypy and at run time); ``KNOBS`` lists them in declaration order and
``docs/CONFIGURATION.md`` is checked against it by a test, so a variable added
without documentation fails CI.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal, cast

from gateway.core.cors import parse_origins
from gateway.core.knobs import Kind as Kind
from gateway.core.knobs import Knob as Knob
from gateway.core.knobs import knob
from vx11site.env import EnvError

FailMode = Literal["local", "open", "closed"]

#: shub's own health answers: "health" priority, and shared by the response cache.
SHUB_HEALTH_PATHS = frozenset({"/shub/health", "/shub/ready"})
#: The /shub paths that need no token unless ``VX11_SHUB_PUBLIC_PATHS`` says otherwise.
SHUB_PUBLIC_PATHS = (*sorted(SHUB_HEALTH_PATHS), "/shub/openapi.json")
#: The /shub paths a metric names (any other is counted as "other").
SHUB_METRIC_PATHS = frozenset({*SHUB_PUBLIC_PATHS, "/shub/cache/clear"})


def _fail_mode(value: str) -> FailMode:
    mode = value.lower()
    if mode not in ("local", "open", "closed"):
        raise EnvError(f"VX11_RATE_LIMIT_FAIL_MODE must be local, open or closed, got {mode!r}")
    return cast("FailMode", mode)


def _heartbeat(value: float) -> float:
    """0 (off) or at least a second: a sub-second beat would be a timer storm per stream."""
    if 0 < value < 1:
        raise EnvError(f"VX11_SSE_HEARTBEAT_SECONDS must be 0 (off) or >= 1, got {value:g}")
    return value


class GatewaySettings:
    """Attribute access to every knob: ``gw.rate_limit_token``, ``gw.cb_enabled`` …"""

    # --- authentication -------------------------------------------------
    token = knob("VX11_TOKEN", [], "Operator tokens (comma-separated), full rights.", secret=True)
    gateway_token = knob(
        "VX11_GATEWAY_TOKEN",
        [],
        "Tokens for protected /shub paths (X-VX11-GW-Token); falls back to VX11_TOKEN.",
        secret=True,
    )
    auth_enabled = knob(
        "VX11_AUTH_ENABLED", True, "Token checks on; false is for development only."
    )
    # --- request handling -----------------------------------------------
    max_body_bytes = knob(
        "VX11_MAX_BODY_BYTES",
        10 * 1024 * 1024,
        "Largest request body accepted (413 above).",
        minimum=0,
    )
    client_body_timeout = knob(
        "VX11_CLIENT_BODY_TIMEOUT",
        10.0,
        "Seconds a request body may make no progress before 408 (the upstream call is cancelled).",
        minimum=0.01,
    )
    trusted_proxies = knob("VX11_TRUSTED_PROXIES", [], "CIDRs whose X-Forwarded-For is trusted.")
    upstream_pool_size = knob(
        "VX11_UPSTREAM_POOL_SIZE", 512, "Upstream connections kept per process.", minimum=1
    )
    connect_timeout = knob(
        "VX11_CONNECT_TIMEOUT",
        5.0,
        "Most seconds a connect to a module takes (inside the route's deadline).",
        minimum=0.01,
    )
    sse_heartbeat_seconds = knob(
        "VX11_SSE_HEARTBEAT_SECONDS",
        15.0,
        "An idle SSE answer gets a `: keep-alive` comment this often, at event boundaries "
        "(0: off; else at least 1 s).",
        minimum=0,
        convert=_heartbeat,
    )
    route_refresh_seconds = knob(
        "VX11_ROUTE_REFRESH_SECONDS",
        0.5,
        "How often a process checks the configuration version (in Redis, else in the database).",
        minimum=0.05,
    )
    # --- Context-7 ------------------------------------------------------
    context7_enabled = knob(
        "VX11_CONTEXT7_ENABLED", True, "Context-7 sessions on chat-like routes."
    )
    context7_ttl_seconds = knob(
        "VX11_CONTEXT7_TTL_SECONDS", 3600, "Sliding session TTL from last activity.", minimum=1
    )
    context7_max_age_seconds = knob(
        "VX11_CONTEXT7_MAX_AGE_SECONDS", 86400, "Absolute session lifetime cap.", minimum=1
    )
    context7_max_messages = knob(
        "VX11_CONTEXT7_MAX_MESSAGES", 50, "Messages kept per session.", minimum=1
    )
    context7_purge_interval = knob(
        "VX11_CONTEXT7_PURGE_INTERVAL",
        300.0,
        "How often the health-check worker deletes expired sessions (s); 0 turns it off.",
        minimum=0,
    )
    # --- circuit breaker ------------------------------------------------
    cb_enabled = knob("VX11_CB_ENABLED", True, "Per-module circuit breakers.")
    cb_failure_threshold = knob(
        "VX11_CB_FAILURE_THRESHOLD", 3, "Consecutive failures that open a breaker.", minimum=1
    )
    cb_recovery_timeout = knob(
        "VX11_CB_RECOVERY_TIMEOUT", 60.0, "Seconds open before half-open.", minimum=0
    )
    cb_half_open_max_calls = knob(
        "VX11_CB_HALF_OPEN_MAX_CALLS", 1, "Concurrent trial calls when half-open.", minimum=1
    )
    cb_success_threshold = knob(
        "VX11_CB_SUCCESS_THRESHOLD", 1, "Successes in half-open that close it.", minimum=1
    )
    # --- retries ----------------------------------------------------------
    retry_max = knob(
        "VX11_RETRY_MAX", 3, "Retries after the first attempt (idempotent calls).", minimum=0
    )
    retry_budget_ratio = knob(
        "VX11_RETRY_BUDGET_RATIO", 0.2, "Retries allowed as a share of recent requests.", minimum=0
    )
    retry_budget_min = knob(
        "VX11_RETRY_BUDGET_MIN", 3, "Retries always allowed in flight per module.", minimum=0
    )
    # --- outlier ejection (targets of a module) -----------------------------
    outlier_consecutive_failures = knob(
        "VX11_OUTLIER_CONSECUTIVE_FAILURES",
        5,
        "Consecutive gateway failures (connect error, timeout, 502/503/504) that eject a target.",
        minimum=1,
    )
    outlier_base_ejection_seconds = knob(
        "VX11_OUTLIER_BASE_EJECTION_SECONDS",
        30.0,
        "A target's ejection lasts this × its ejection count (+0–10 % jitter).",
        minimum=0.1,
    )
    outlier_max_ejection_seconds = knob(
        "VX11_OUTLIER_MAX_EJECTION_SECONDS", 300.0, "Longest ejection (before jitter).", minimum=0.1
    )
    outlier_max_ejection_percent = knob(
        "VX11_OUTLIER_MAX_EJECTION_PERCENT",
        50,
        "Most targets of a module ejected at once, in percent (one may always be).",
        minimum=0,
    )
    # --- rate limits ------------------------------------------------------
    rate_limit_enabled = knob("VX11_RATE_LIMIT_ENABLED", True, "Rate limiting on.")
    rate_limit_enforce = knob(
        "VX11_RATE_LIMIT_ENFORCE", True, "false: shadow mode (count, do not refuse)."
    )
    rate_limit_token = knob(
        "VX11_RATE_LIMIT_TOKEN", 1000, "Requests per window per client token.", minimum=1
    )
    rate_limit_ip = knob(
        "VX11_RATE_LIMIT_IP", 5000, "Requests per window per client IP.", minimum=1
    )
    rate_limit_protected = knob(
        "VX11_RATE_LIMIT_PROTECTED",
        100,
        "Requests per window per client on protected routes and /shub paths.",
        minimum=1,
    )
    rate_limit_window = knob("VX11_RATE_LIMIT_WINDOW", 60, "Window length in seconds.", minimum=1)
    rate_limit_fail_mode = knob(
        "VX11_RATE_LIMIT_FAIL_MODE",
        "local",
        "Store failure: local, open or closed.",
        convert=_fail_mode,
    )
    store_timeout = knob(
        "VX11_STORE_TIMEOUT",
        0.05,
        "Timeout (s) of one shared-store call on the request path.",
        minimum=0.001,
    )
    # --- /shub and cache ----------------------------------------------------
    shub_strip_prefix = knob("VX11_SHUB_STRIP_PREFIX", True, "Strip /shub before forwarding.")
    shub_public_paths = knob(
        "VX11_SHUB_PUBLIC_PATHS",
        list(SHUB_PUBLIC_PATHS),
        "/shub paths that need no token.",
        convert=frozenset,
    )
    shub_timeout = knob("VX11_SHUB_TIMEOUT", 30.0, "Timeout (s) of a /shub call.", minimum=0.1)
    cache_enabled = knob("VX11_CACHE_ENABLED", True, "Cache GET /shub/health and /shub/ready.")
    cache_ttl_health = knob(
        "VX11_CACHE_TTL_HEALTH", 60, "Seconds a health answer is cached.", minimum=1
    )
    # --- backpressure -------------------------------------------------------
    max_inflight = knob(
        "VX11_MAX_INFLIGHT", 256, "Upstream calls in flight per process.", minimum=1
    )
    queue_max = knob(
        "VX11_QUEUE_MAX", 1000, "Waiters queued per process before shedding.", minimum=0
    )
    module_queue_max = knob(
        "VX11_MODULE_QUEUE_MAX",
        1000,
        "Waiters queued per module at its max_concurrent cap before shedding.",
        minimum=0,
    )
    max_connections = knob(
        "VX11_MAX_CONNECTIONS",
        10000,
        "Client connections (HTTP and WebSocket) per worker; a new one past it gets 503.",
        minimum=1,
    )
    client_header_timeout = knob(
        "VX11_CLIENT_HEADER_TIMEOUT",
        10.0,
        "Seconds from a request head's first byte to its end before the connection is closed.",
        minimum=0.1,
    )
    # --- health checks ------------------------------------------------------
    health_interval = knob(
        "VX11_HEALTH_INTERVAL", 5.0, "Probe interval while healthy (s).", minimum=0.1
    )
    health_incident_interval = knob(
        "VX11_HEALTH_INCIDENT_INTERVAL", 1.0, "Probe interval during an incident (s).", minimum=0.1
    )
    health_max_backoff = knob(
        "VX11_HEALTH_MAX_BACKOFF", 60.0, "Longest probe interval while down (s).", minimum=0.1
    )
    health_timeout = knob("VX11_HEALTH_TIMEOUT", 2.0, "Timeout of one probe (s).", minimum=0.1)
    # --- metrics ------------------------------------------------------------
    metrics_enabled = knob("VX11_METRICS_ENABLED", True, "Serve /metrics.")
    metrics_allowed_ips = knob(
        "VX11_METRICS_ALLOWED_IPS", [], "CIDRs allowed to scrape /metrics (empty: all)."
    )
    # --- storage / process --------------------------------------------------
    redis_url = knob("VX11_REDIS_URL", "", "Redis for shared state, cache and channel layer.")
    workers = knob(
        "VX11_WORKERS",
        1,
        "Worker processes behind this configuration (checks warn "
        "when several share in-process state).",
        minimum=1,
    )
    port = knob("VX11_PORT", 8000, "Port of the development run (`./run dev`).", minimum=1)
    access_log = knob("VX11_ACCESS_LOG", False, "One JSON log line per proxied request.")
    # --- browser clients (CORS, SPEC §22) ------------------------------------
    cors_allowed_origins = knob(
        "VX11_CORS_ALLOWED_ORIGINS",
        [],
        "Origins (scheme://host[:port], comma-separated) whose browser clients may call the "
        "gateway; empty: no CORS headers at all.",
        convert=parse_origins,
    )
    cors_allow_credentials = knob(
        "VX11_CORS_ALLOW_CREDENTIALS",
        False,
        "Send Access-Control-Allow-Credentials: true to allowed origins (cookies, staff session).",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] | None = None
        #: Bumped by every reload, so objects built from the knobs know to rebuild.
        self.generation = 0

    def values(self) -> dict[str, Any]:
        """Every knob's value by attribute name (read from the environment once)."""
        with self._lock:
            values = self._values
            if values is None:
                values = {k.name: k.read() for k in KNOBS}
                if not values["gateway_token"]:
                    values["gateway_token"] = list(values["token"])
                self._values = values
                self.__dict__.update(values)  # shadows the descriptors: plain lookups
            return values

    def reload(self) -> None:
        with self._lock:
            for name in self._values or ():
                self.__dict__.pop(name, None)
            self._values = None
            self.generation += 1


#: Every knob, in declaration order.
KNOBS: tuple[Knob[Any], ...] = tuple(
    v for v in vars(GatewaySettings).values() if isinstance(v, Knob)
)

gw = GatewaySettings()


def knob_table() -> str:
    """The ``VX11_*`` table (README.md between its ``knobs`` markers, and CONFIGURATION.md)."""

    def show(item: Knob[Any]) -> str:
        if item.kind == "list":
            return ", ".join(item.default) if item.default else "(empty)"
        if item.kind == "bool":
            return "true" if item.default else "false"
        return str(item.default) if item.default != "" else "(empty)"

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for item in KNOBS:
        secret = " Secret: `NAME_FILE` reads it from a file." if item.secret else ""
        lines.append(f"| `{item.env}` | {show(item)} | {item.help}{secret} |")
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """``docs/CONFIGURATION.md``, generated from ``KNOBS`` (a test keeps the file in step)."""

    lines = [
        "# Configuration reference",
        "",
        "Generated from `gateway/core/conf.py` by `python -m gateway.core.conf > docs/CONFIGURATION.md`;",
        "`tests/gateway/test_config_reference.py` fails when the two differ.",
        "",
        "Django and storage settings read by `vx11site/settings.py`:",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
        "| `DJANGO_SECRET_KEY` | random, kept in `var/secret_key` | Django's signing key "
        "(`DJANGO_SECRET_KEY_FILE` reads it from a file) |",
        "| `DJANGO_DEBUG` | off | `1` turns debug on (the development run does) |",
        "| `DJANGO_ALLOWED_HOSTS` | localhost, 127.0.0.1, [::1] | Host names served |",
        "| `DJANGO_CSRF_TRUSTED_ORIGINS` | (empty) | Origins trusted for admin forms behind TLS |",
        "| `DJANGO_SECURE_COOKIES` | false | Session/CSRF cookies only over HTTPS |",
        "| `DJANGO_SECURE_PROXY_SSL_HEADER` | false | Trust `X-Forwarded-Proto: https` "
        "on Django's pages (the TLS proxy must overwrite it) |",
        "| `DJANGO_SECURE_SSL_REDIRECT` | false | Redirect Django's pages to HTTPS |",
        "| `DJANGO_SECURE_REDIRECT_EXEMPT` | ^health$, ^ready$, ^metrics$ | Paths (regexes, "
        "no leading slash) never redirected |",
        "| `DJANGO_SECURE_HSTS_SECONDS` | 0 | `Strict-Transport-Security` max-age (0: none) |",
        "| `DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS` | false | HSTS for every subdomain too |",
        "| `DJANGO_SECURE_HSTS_PRELOAD` | false | HSTS `preload` (browser preload lists) |",
        "| `DATABASE_URL` | SQLite file `var/vx11.sqlite3` | e.g. `postgres://user:pw@host/db` |",
        "| `VX11_VAR_DIR` | `./var` | Where the SQLite file and generated secrets live |",
        "| `VX11_LOG_LEVEL` | INFO | Level of the JSON logs |",
        "| `VX11_MODULE_<NAME>_URL` | code default | Module base URL, e.g. "
        "`VX11_MODULE_SWITCH_URL`; `VX11_SHUB_UPSTREAM` is an alias for shub. A comma-separated "
        "list is the module's targets (replicas), e.g. `http://10.0.0.5:8002,http://10.0.0.6:8002`: "
        "each item `http(s)://host[:port]`, no two with the same `host:port` (an invalid list is "
        "ignored whole, `manage.py check` names the item: `gateway.E002`); the module's `Target` "
        "rows replace it |",
        "| `VX11_MODULE_<NAME>_LB` | least_request | How a target is chosen: `least_request`, "
        "`round_robin` or `session` (`gateway.E004` when invalid); the `Module` row's `lb` "
        "overrides it |",
        "| `VX11_MODULE_<NAME>_MAX_CONCURRENT` | 0 | The module's own cap on upstream calls "
        "in flight per process (0: only `VX11_MAX_INFLIGHT`); the `Module` row's "
        "`max_concurrent` overrides it |",
        "| `OTEL_EXPORTER_OTLP_ENDPOINT` | (unset: no tracing) | OpenTelemetry traces over "
        "OTLP/HTTP to this collector (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); the other "
        "standard `OTEL_*` variables apply: docs/DEPLOYMENT.md, Tracing |",
        "",
        "Gateway knobs (`VX11_*`), read lazily by `gateway.core.conf.gw`:",
        "",
    ]
    return "\n".join(lines) + "\n" + knob_table()


def readme_with_knobs(readme: str) -> str:
    """README.md with the knob table between its markers replaced by the current one."""
    start, end = "<!-- knobs:start -->\n", "<!-- knobs:end -->"
    head, _, rest = readme.partition(start)
    _, _, tail = rest.partition(end)
    return head + start + knob_table() + end + tail


#: The project's README, whose knob table ``python -m gateway.core.conf --readme`` refreshes.
README = Path(__file__).resolve().parents[2] / "README.md"

if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--readme"]:  # python -m gateway.core.conf --readme: refresh README.md
        README.write_text(readme_with_knobs(README.read_text()))
    else:
        print(reference_markdown(), end="")
