"""The probe itself and where its results are kept.

A probe is ``GET <module url><health_path>`` through the upstream seam
(``gateway.upstream.send``) on a pool of its own (:func:`probe_transport`: the proxy's
connections are never used, nor taken); a 2xx within ``VX11_HEALTH_TIMEOUT`` (the whole
exchange, the body included) passes. No redirect is followed, no proxy from the
environment is used, TLS is verified as for every outbound call (``gateway.upstream.tls``).
Results go to ``ModuleHealth`` rows (:func:`save_health`); :func:`load_states` reads them
back so a restarted or newly elected checker continues the backoff. Each target of a
module is probed on its own (``probe(..., target=t)``); per-target results go to the shared
cache (:func:`save_target_health`: no table of their own), the module's row holds the
pool's verdict (``up`` / ``degraded`` / ``down``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.core.cache import cache
from django.db import close_old_connections

from gateway.config.modules import ModuleInfo, TargetInfo, build_modules
from gateway.config.snapshot import load_targets
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
    target: str = ""  # the probed target's host:port ("": the module as a whole)


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
    target: TargetInfo | None = None,
) -> ProbeResult:
    """One ``GET url+health_path``; 2xx passes. Latency (body read) is measured on ``timer``.

    ``target``: that target of the module (the seam's ``origin``: it and no other); else the
    module's first enabled one."""
    at = wall()
    key, origin = (target.key, target.url) if target is not None else ("", None)
    started = timer()
    request = OutboundRequest(
        "GET", info.health_path, [("User-Agent", USER_AGENT), ("Accept", "*/*")], None, timeout
    )
    try:
        response = await send(info, request, client, origin=origin)
        try:
            async for _ in response.iter_chunks():  # read to the end: the connection is kept
                pass
        except BaseException:
            response.close()
            raise
        response.release()
    except Exception as exc:
        return ProbeResult(info.name, False, None, _error_text(exc, timeout), at, key)
    latency = round((timer() - started) * 1000.0, 2)
    if 200 <= response.status < 300:
        return ProbeResult(info.name, True, latency, "", at, key)
    return ProbeResult(info.name, False, latency, f"HTTP {response.status}", at, key)


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
    """The module table straight from the database, with each module's targets (the
    worker sees admin edits at once)."""
    close_old_connections()
    return build_modules([m.info() for m in Module.objects.all()], load_targets())


#: Per-target results, one cache entry per module (``{target key: health dict}``): in Redis
#: when it is configured (every process and host reads them: ``GET /vx11/modules``, the
#: dashboard, ``/metrics``), else in this process only.
TARGET_HEALTH_KEY = "target-health:{}"
TARGET_HEALTH_TTL = 3600


def save_target_health(module: str, found: dict[str, dict[str, Any]]) -> None:
    cache.set(TARGET_HEALTH_KEY.format(module), found, TARGET_HEALTH_TTL)


def load_target_health(modules: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{module: {target key: health}}`` for the modules that have results."""
    keys = {TARGET_HEALTH_KEY.format(m): m for m in modules}
    return {keys[k]: v for k, v in cache.get_many(list(keys)).items() if isinstance(v, dict)}


def target_state(health: dict[str, Any]) -> ModuleState:
    """A target's schedule state from its stored result (a new leader continues it)."""
    failures = int(health.get("consecutive_failures") or 0)
    return ModuleState(
        str(health.get("status", "unknown")), failures, 0 if failures else 1, bool(failures)
    )


__all__ = [
    "TARGET_HEALTH_KEY",
    "USER_AGENT",
    "ProbeResult",
    "health_dict",
    "load_modules",
    "load_states",
    "load_target_health",
    "probe",
    "probe_transport",
    "save_health",
    "save_target_health",
    "target_state",
]
