"""Gateway knobs (``VX11_*``), read lazily from the environment.

Like DRF's ``APISettings``: nothing is read at import time; the first access
reads every knob once, ``reload()`` re-reads them (tests call it after changing
the environment). Each knob is declared once in ``KNOBS`` with its default and
meaning; ``docs/CONFIGURATION.md`` is checked against this table by a test, so
a variable added without documentation fails CI.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

from vx11site.env import env_bool, env_float, env_int, env_list, env_str

Kind = Literal["bool", "int", "float", "str", "list"]


@dataclass(frozen=True)
class Knob:
    env: str
    kind: Kind
    default: Any
    help: str
    minimum: float | None = None
    secret: bool = False


KNOBS: tuple[Knob, ...] = (
    # --- authentication -------------------------------------------------
    Knob("VX11_TOKEN", "list", [], "Operator tokens (comma-separated), full rights.", secret=True),
    Knob(
        "VX11_GATEWAY_TOKEN",
        "list",
        [],
        "Tokens for protected /shub paths (X-VX11-GW-Token); falls back to VX11_TOKEN.",
        secret=True,
    ),
    Knob("VX11_AUTH_ENABLED", "bool", True, "Token checks on; false is for development only."),
    # --- request handling -----------------------------------------------
    Knob(
        "VX11_MAX_BODY_BYTES",
        "int",
        10 * 1024 * 1024,
        "Largest request body accepted (413 above).",
        minimum=0,
    ),
    Knob(
        "VX11_CLIENT_BODY_TIMEOUT",
        "float",
        10.0,
        "Seconds a request body may make no progress before 408 (the upstream call is cancelled).",
        minimum=0.01,
    ),
    Knob("VX11_TRUSTED_PROXIES", "list", [], "CIDRs whose X-Forwarded-For is trusted."),
    Knob(
        "VX11_UPSTREAM_POOL_SIZE", "int", 512, "Upstream connections kept per process.", minimum=1
    ),
    Knob(
        "VX11_ROUTE_REFRESH_SECONDS",
        "float",
        0.5,
        "How often a process checks the configuration version (in Redis, else in the database).",
        minimum=0.05,
    ),
    # --- Context-7 ------------------------------------------------------
    Knob("VX11_CONTEXT7_ENABLED", "bool", True, "Context-7 sessions on chat-like routes."),
    Knob(
        "VX11_CONTEXT7_TTL_SECONDS",
        "int",
        3600,
        "Sliding session TTL from last activity.",
        minimum=1,
    ),
    Knob(
        "VX11_CONTEXT7_MAX_AGE_SECONDS", "int", 86400, "Absolute session lifetime cap.", minimum=1
    ),
    Knob("VX11_CONTEXT7_MAX_MESSAGES", "int", 50, "Messages kept per session.", minimum=1),
    Knob(
        "VX11_CONTEXT7_PURGE_INTERVAL",
        "float",
        300.0,
        "How often the health-check worker deletes expired sessions (s); 0 turns it off.",
        minimum=0,
    ),
    # --- circuit breaker ------------------------------------------------
    Knob("VX11_CB_ENABLED", "bool", True, "Per-module circuit breakers."),
    Knob(
        "VX11_CB_FAILURE_THRESHOLD",
        "int",
        3,
        "Consecutive failures that open a breaker.",
        minimum=1,
    ),
    Knob("VX11_CB_RECOVERY_TIMEOUT", "float", 60.0, "Seconds open before half-open.", minimum=0),
    Knob(
        "VX11_CB_HALF_OPEN_MAX_CALLS", "int", 1, "Concurrent trial calls when half-open.", minimum=1
    ),
    Knob("VX11_CB_SUCCESS_THRESHOLD", "int", 1, "Successes in half-open that close it.", minimum=1),
    # --- retries ----------------------------------------------------------
    Knob(
        "VX11_RETRY_MAX", "int", 3, "Retries after the first attempt (idempotent calls).", minimum=0
    ),
    Knob(
        "VX11_RETRY_BUDGET_RATIO",
        "float",
        0.2,
        "Retries allowed as a share of recent requests.",
        minimum=0,
    ),
    Knob(
        "VX11_RETRY_BUDGET_MIN", "int", 3, "Retries always allowed in flight per module.", minimum=0
    ),
    # --- rate limits ------------------------------------------------------
    Knob("VX11_RATE_LIMIT_ENABLED", "bool", True, "Rate limiting on."),
    Knob("VX11_RATE_LIMIT_ENFORCE", "bool", True, "false: shadow mode (count, do not refuse)."),
    Knob("VX11_RATE_LIMIT_TOKEN", "int", 1000, "Requests per window per client token.", minimum=1),
    Knob("VX11_RATE_LIMIT_IP", "int", 5000, "Requests per window per client IP.", minimum=1),
    Knob(
        "VX11_RATE_LIMIT_PROTECTED",
        "int",
        100,
        "Requests per window per client on protected routes and /shub paths.",
        minimum=1,
    ),
    Knob("VX11_RATE_LIMIT_WINDOW", "int", 60, "Window length in seconds.", minimum=1),
    Knob("VX11_RATE_LIMIT_FAIL_MODE", "str", "local", "Store failure: local, open or closed."),
    Knob(
        "VX11_STORE_TIMEOUT",
        "float",
        0.05,
        "Timeout (s) of one shared-store call on the request path.",
        minimum=0.001,
    ),
    # --- /shub and cache ----------------------------------------------------
    Knob("VX11_SHUB_STRIP_PREFIX", "bool", True, "Strip /shub before forwarding."),
    Knob(
        "VX11_SHUB_PUBLIC_PATHS",
        "list",
        ["/shub/health", "/shub/ready", "/shub/openapi.json"],
        "/shub paths that need no token.",
    ),
    Knob("VX11_SHUB_TIMEOUT", "float", 30.0, "Timeout (s) of a /shub call.", minimum=0.1),
    Knob("VX11_CACHE_ENABLED", "bool", True, "Cache GET /shub/health and /shub/ready."),
    Knob("VX11_CACHE_TTL_HEALTH", "int", 60, "Seconds a health answer is cached.", minimum=1),
    # --- backpressure -------------------------------------------------------
    Knob("VX11_MAX_INFLIGHT", "int", 256, "Upstream calls in flight per process.", minimum=1),
    Knob("VX11_QUEUE_MAX", "int", 1000, "Waiters queued per process before shedding.", minimum=0),
    Knob(
        "VX11_MAX_CONNECTIONS",
        "int",
        10000,
        "Client connections (HTTP and WebSocket) per worker; a new one past it gets 503.",
        minimum=1,
    ),
    Knob(
        "VX11_CLIENT_HEADER_TIMEOUT",
        "float",
        10.0,
        "Seconds from a request head's first byte to its end before the connection is closed.",
        minimum=0.1,
    ),
    # --- health checks ------------------------------------------------------
    Knob("VX11_HEALTH_INTERVAL", "float", 5.0, "Probe interval while healthy (s).", minimum=0.1),
    Knob(
        "VX11_HEALTH_INCIDENT_INTERVAL",
        "float",
        1.0,
        "Probe interval during an incident (s).",
        minimum=0.1,
    ),
    Knob(
        "VX11_HEALTH_MAX_BACKOFF",
        "float",
        60.0,
        "Longest probe interval while down (s).",
        minimum=0.1,
    ),
    Knob("VX11_HEALTH_TIMEOUT", "float", 2.0, "Timeout of one probe (s).", minimum=0.1),
    # --- metrics ------------------------------------------------------------
    Knob("VX11_METRICS_ENABLED", "bool", True, "Serve /metrics."),
    Knob("VX11_METRICS_ALLOWED_IPS", "list", [], "CIDRs allowed to scrape /metrics (empty: all)."),
    # --- storage / process --------------------------------------------------
    Knob("VX11_REDIS_URL", "str", "", "Redis for shared state, cache and channel layer."),
    Knob(
        "VX11_WORKERS",
        "int",
        1,
        "Worker processes behind this configuration (checks warn "
        "when several share in-process state).",
        minimum=1,
    ),
    Knob("VX11_PORT", "int", 8000, "Port of the development run (`./run dev`).", minimum=1),
    Knob("VX11_ACCESS_LOG", "bool", False, "One JSON log line per proxied request."),
)


def _read(knob: Knob) -> Any:
    match knob.kind:
        case "bool":
            return env_bool(knob.env, knob.default)
        case "int":
            return env_int(
                knob.env, knob.default, minimum=None if knob.minimum is None else int(knob.minimum)
            )
        case "float":
            return env_float(knob.env, knob.default, minimum=knob.minimum)
        case "list":
            return env_list(knob.env, knob.default)
        case _:
            return env_str(knob.env, knob.default)


def _attr(env: str) -> str:
    return env.removeprefix("VX11_").lower()


class GatewaySettings:
    """Attribute access to every knob: ``gw.rate_limit_token``, ``gw.cb_enabled`` …"""

    def __init__(self) -> None:
        self._values: dict[str, Any] | None = None
        self._lock = threading.Lock()
        #: Bumped by every reload, so objects built from the knobs know to rebuild.
        self.generation = 0

    def _load(self) -> dict[str, Any]:
        values = {_attr(k.env): _read(k) for k in KNOBS}
        if not values["gateway_token"]:
            values["gateway_token"] = list(values["token"])
        mode = str(values["rate_limit_fail_mode"]).lower()
        if mode not in {"local", "open", "closed"}:
            from vx11site.env import EnvError

            raise EnvError(f"VX11_RATE_LIMIT_FAIL_MODE must be local, open or closed, got {mode!r}")
        values["rate_limit_fail_mode"] = mode
        values["shub_public_paths"] = frozenset(values["shub_public_paths"])
        return values

    def __getattr__(self, name: str) -> Any:
        values = self._values
        if values is None:
            with self._lock:
                if self._values is None:
                    self._values = self._load()
                values = self._values
        try:
            return values[name]
        except KeyError:
            raise AttributeError(name) from None

    def reload(self) -> None:
        with self._lock:
            self._values = None
            self.generation += 1


gw = GatewaySettings()


def knob_table() -> str:
    """The ``VX11_*`` table (README.md between its ``knobs`` markers, and CONFIGURATION.md)."""

    def show(knob: Knob) -> str:
        if knob.kind == "list":
            return ", ".join(knob.default) if knob.default else "(empty)"
        if knob.kind == "bool":
            return "true" if knob.default else "false"
        return str(knob.default) if knob.default != "" else "(empty)"

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for knob in KNOBS:
        secret = " Secret: `NAME_FILE` reads it from a file." if knob.secret else ""
        lines.append(f"| `{knob.env}` | {show(knob)} | {knob.help}{secret} |")
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
        "`VX11_MODULE_SWITCH_URL`; `VX11_SHUB_UPSTREAM` is an alias for shub |",
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


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if sys.argv[1:] == ["--readme"]:  # python -m gateway.core.conf --readme: refresh README.md
        path = Path(__file__).resolve().parent.parent / "README.md"
        path.write_text(readme_with_knobs(path.read_text()))
    else:
        print(reference_markdown(), end="")
