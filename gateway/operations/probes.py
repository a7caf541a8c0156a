"""The probe itself and where its results are kept.

A probe is ``GET <module url><health_path>`` through the upstream seam
(``gateway.upstream.send``) on a pool of its own (:func:`probe_transport`: the proxy's
connections are never used, nor taken); a 2xx within ``VX11_HEALTH_TIMEOUT`` (the whole
exchange, the body included) passes. No redirect is followed, no proxy from the
environment is used, TLS is verified as for every outbound call (``gateway.upstream.tls``).
Results go to ``ModuleHealth`` rows (:func:`save_health`); :func:`load_states` reads them
back so a restarted or newly elected checker continues the backoff.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import close_old_connections

from gateway.config.modules import ModuleInfo, build_modules
from gateway.core.clock import Clock
from gateway.core.problems import GatewayError, UpstreamTimeout, UpstreamUnavailable
from gateway.models import Module, ModuleHealth
from gateway.operations.health_schedule import ModuleState
from gateway.upstream import H1Transport, OutboundRequest, Transport, send
from gateway.upstream.h1 import Pool

USER_AGENT = "vx11-gateway-health/1.0"
#: Probe connections at most (all modules together), and how long one is kept idle.
PROBE_CONNECTIONS = 64
PROBE_IDLE_SECONDS = 5.0


def probe_transport() -> H1Transport:
    """A transport with a pool of its own for one checker (close it: ``async with``)."""
    return H1Transport(Pool(limit=PROBE_CONNECTIONS, idle_timeout=PROBE_IDLE_SECONDS))


@dataclass(frozen=True)
class ProbeResult:
    module: str
    ok: bool
    latency_ms: float | None
    error: str
    at: float  # epoch seconds


def _error_text(exc: Exception, timeout: float) -> str:
    """A short, secret-free reason (module URLs carry no credentials; headers are not shown)."""
    if isinstance(exc, UpstreamTimeout):
        return f"timeout after {timeout:g} s"
    if isinstance(exc, UpstreamUnavailable):
        return "connection failed"
    cause = exc.__cause__ if isinstance(exc, GatewayError) and exc.__cause__ else exc
    return f"probe error: {type(cause).__name__}"


async def probe(
    client: Transport,
    info: ModuleInfo,
    timeout: float,
    wall: Clock = time.time,
    timer: Clock = time.perf_counter,
) -> ProbeResult:
    """One ``GET url+health_path``; 2xx passes. Latency (body read) is measured on ``timer``."""
    at = wall()
    started = timer()
    request = OutboundRequest(
        "GET", info.health_path, [("User-Agent", USER_AGENT), ("Accept", "*/*")], None, timeout
    )
    try:
        response = await send(info, request, client)
        try:
            async for _ in response.iter_chunks():  # read to the end: the connection is kept
                pass
        except BaseException:
            response.close()
            raise
        response.release()
    except Exception as exc:
        return ProbeResult(info.name, False, None, _error_text(exc, timeout), at)
    latency = round((timer() - started) * 1000.0, 2)
    if 200 <= response.status < 300:
        return ProbeResult(info.name, True, latency, "", at)
    return ProbeResult(info.name, False, latency, f"HTTP {response.status}", at)


def health_dict(state: ModuleState, result: ProbeResult) -> dict[str, Any]:
    return {
        "status": state.status,
        "latency_ms": result.latency_ms,
        "last_check": result.at,
        "consecutive_failures": state.consecutive_failures,
        "last_error": result.error,
    }


def save_health(module: str, health: dict[str, Any]) -> None:
    """Write one ``ModuleHealth`` row (synchronous)."""
    close_old_connections()  # a long-running worker outlives CONN_MAX_AGE and DB restarts
    ModuleHealth.objects.update_or_create(
        module=module,
        defaults={
            "status": health["status"],
            "latency_ms": health["latency_ms"],
            "last_check": datetime.fromtimestamp(health["last_check"], tz=UTC),
            "consecutive_failures": health["consecutive_failures"],
            "last_error": health["last_error"][:300],
        },
    )


def load_states() -> dict[str, ModuleState]:
    """The stored results, so a restarted or newly elected checker continues the backoff."""
    return {
        row.module: ModuleState(
            row.status,
            row.consecutive_failures,
            0 if row.consecutive_failures else 1,
            bool(row.consecutive_failures),
        )
        for row in ModuleHealth.objects.all()
    }


def load_modules() -> dict[str, ModuleInfo]:
    """The module table straight from the database (the worker sees admin edits at once)."""
    rows = [
        ModuleInfo(m.name, m.url, m.health_path, m.enabled, "database")
        for m in Module.objects.all()
    ]
    return build_modules(rows)


__all__ = [
    "USER_AGENT",
    "ProbeResult",
    "health_dict",
    "load_modules",
    "load_states",
    "probe",
    "probe_transport",
    "save_health",
]
