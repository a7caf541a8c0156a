"""The operator dashboard: one admin page, live through ``/ws/events`` (SPEC §14).

The page renders every module's breaker and health from the server (so it is
useful before the socket connects, or without JavaScript); ``dashboard.js`` then
keeps it current from the event stream. Its buttons call the management API with
the staff session: breaker actions go to ``POST /vx11/circuit-breaker/{module}``;
"probe now" and "clear cache" have session endpoints here, because the public
ones need gateway tokens the browser does not hold.

The URLs are added by wrapping the admin site's ``get_urls`` (:func:`install`),
the way ``django/contrib/auth/admin.py`` adds its own views.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.contrib import admin
from django.contrib.admin import AdminSite
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.views.decorators.http import require_POST

from gateway.config.snapshot import holder
from gateway.console.consumers import state_snapshot
from gateway.console.middleware import problem_response
from gateway.core import metrics
from gateway.core.problems import AuthRequired, Forbidden, GatewayError, NotFound
from gateway.operations import cache, configuration, registry
from gateway.operations import health as healthcheck
from gateway.operations.breakers import breaker_statuses, health_rows

# --------------------------------------------------------------------------- presentation

BREAKER_TONES = {"closed": "ok", "half_open": "warn", "open": "bad"}
HEALTH_TONES = {"up": "ok", "degraded": "warn", "down": "bad", "unknown": "idle"}
#: Modules in trouble first (traffic.js adds "error % high" once the graphs load).
TROUBLE = {"open": 4, "half_open": 3, "down": 3, "degraded": 2}


def badge(text: str, tone: str) -> SafeString:
    """Colour plus text, never colour alone (the admin's lists use it too)."""
    colours = {"ok": "#1b7f3b", "warn": "#a86400", "bad": "#b3261e", "idle": "#5f6368"}
    return format_html(
        '<span style="background:{};color:#fff;padding:1px 7px;border-radius:9px;'
        'font-size:11px;font-weight:600;white-space:nowrap">{}</span>',
        colours.get(tone, "#5f6368"),
        text,
    )


def breaker_label(breaker: dict[str, Any]) -> str:
    state = str(breaker.get("state", "unknown"))
    label = state.replace("_", "-")
    if breaker.get("forced"):
        label += f" (forced {breaker['forced']})"
    return label


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%H:%M:%S UTC")


def bulkhead_text(bulkhead: dict[str, int] | None) -> str:
    """Calls in flight / the module's own cap, this process (traffic.js renders the same)."""
    if not bulkhead:
        return "no cap of its own"
    queued = f" · {bulkhead['queued']} queued" if bulkhead["queued"] else ""
    return f"{bulkhead['inflight']} / {bulkhead['max_concurrent']}{queued}"


def target_state(target: dict[str, Any], now: float) -> tuple[str, str]:
    """A target's state as the card shows it, and its tone (dashboard.js renders the same):
    disabled, ejected until …, down (its probe failed), up, or unknown (not probed yet)."""
    if not target.get("enabled", True):
        return "disabled", "idle"
    until = target.get("ejected_until")
    if until is not None and until > now:
        return f"ejected until {_when(until)}", "warn"
    status = (target.get("health") or {}).get("status", "unknown")
    if target.get("down") or status == "down":
        return "down", "bad"
    return status, HEALTH_TONES.get(status, "idle")


def target_rows(module: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Each target of a module's card: ``host:port``, weight, state, in flight."""
    rows = []
    for t in module.get("targets") or ():
        label, tone = target_state(t, now)
        rows.append({**t, "state": label, "tone": tone})
    return rows


def cards(
    state: dict[str, Any], bulkheads: dict[str, dict[str, int]] | None = None
) -> list[dict[str, Any]]:
    """What each module's card shows on first paint (dashboard.js renders the same)."""
    rows = []
    heads = bulkheads or {}
    for name, module in state["modules"].items():
        breaker = state["breakers"].get(name, {})
        status = module.get("status", "unknown")
        rows.append(
            {
                "name": name,
                "url": module.get("url", ""),
                "enabled": module.get("enabled", True),
                "breaker_state": breaker.get("state", "unknown"),
                "breaker_label": breaker_label(breaker),
                "breaker_tone": BREAKER_TONES.get(breaker.get("state", ""), "idle"),
                "failure_count": breaker.get("failure_count", 0),
                "health": status,
                "health_tone": HEALTH_TONES.get(status, "idle"),
                "latency": "—"
                if module.get("latency_ms") is None
                else f"{module['latency_ms']:.0f} ms",
                "last_check": _when(module.get("last_check")),
                "last_error": module.get("last_error", ""),
                "bulkhead": bulkhead_text(heads.get(name)),
                "targets": target_rows(module, state.get("time") or time.time()),
            }
        )
    rows.sort(
        key=lambda r: (-TROUBLE.get(r["breaker_state"], TROUBLE.get(r["health"], 0)), r["name"])
    )
    return rows


def fallback_rows(routes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Routes with a fallback chain (SPEC §19): "chat → switch, falls back to madre", and
    how often each fallback answered or was tried (this process, since it started)."""
    taken = metrics.fallbacks_taken()
    rows = []
    for intent in sorted(routes):
        route = routes[intent]
        if not route["enabled"] or not route["fallbacks"]:
            continue
        chain = [
            {"module": fb["module"], "taken": int(taken.get((intent, fb["module"]), 0))}
            for fb in route["fallbacks"]
        ]
        rows.append({"intent": intent, "module": route["module"], "chain": chain})
    return rows


def dashboard_view(site: AdminSite) -> Callable[[HttpRequest], HttpResponse]:
    def view(request: HttpRequest) -> HttpResponse:
        state = async_to_sync(state_snapshot)()
        bulkheads = registry.bulkhead_view(configuration.module_table())
        context = {
            **site.each_context(request),
            "title": "Live dashboard",
            "is_nav_sidebar_enabled": False,  # the cards need the width
            "cards": cards(state, bulkheads),
            "breaker_url": "/vx11/circuit-breaker/",
            "probe_url": reverse("admin:dashboard-probe", args=["__module__"]),
            "clear_cache_url": reverse("admin:dashboard-clear-cache"),
            "ws_path": "/ws/events",
            "traffic_url": reverse("traffic"),
            "fallbacks": fallback_rows(configuration.effective_routes()),
        }
        return TemplateResponse(request, "admin/gateway/dashboard.html", context)

    return view


# --------------------------------------------------------------------------- session endpoints


def _problem(request: HttpRequest, exc: GatewayError) -> HttpResponse:
    return problem_response(exc, getattr(request, "correlation_id", ""))


async def _refusal(request: HttpRequest) -> HttpResponse | None:
    """Staff sessions only; the answer is problem+json, not a login redirect."""
    user = await request.auser()
    if not user.is_authenticated:
        return _problem(request, AuthRequired("Log in to the admin first."))
    if not (user.is_active and user.is_staff):
        return _problem(request, Forbidden("This action needs a staff account."))
    return None


@require_POST
async def clear_cache(request: HttpRequest) -> HttpResponse:
    """The "clear cache" button: what ``POST /shub/cache/clear`` does, for a staff session."""
    refused = await _refusal(request)
    if refused is not None:
        return refused
    try:
        deleted = await cache.clear_cache("dashboard")
    except GatewayError as exc:
        return _problem(request, exc)
    return JsonResponse({"status": "cleared", "keys_deleted": deleted, "timestamp": time.time()})


@require_POST
async def probe(request: HttpRequest, module: str) -> HttpResponse:
    """The "probe now" button: one health probe, stored and announced like the worker's."""
    refused = await _refusal(request)
    if refused is not None:
        return refused
    info = (await holder.current()).modules.get(module)
    if info is None:
        return _problem(request, NotFound(f"There is no module named {module[:40]!r}."))
    result, state = await sync_to_async(healthcheck.probe_now)(info)
    return JsonResponse({"module": module, **healthcheck.health_dict(state, result)})


# --------------------------------------------------------------------------- wiring


def install(site: AdminSite) -> None:
    """Add the dashboard's URLs in front of the admin site's own (idempotent)."""
    if getattr(site, "_vx11_dashboard", False):
        return
    original = site.get_urls

    def get_urls() -> list[URLPattern | URLResolver]:
        extra: list[URLPattern | URLResolver] = [
            path("dashboard/", site.admin_view(dashboard_view(site)), name="dashboard"),
            path("dashboard/clear-cache/", clear_cache, name="dashboard-clear-cache"),
            path("dashboard/probe/<str:module>/", probe, name="dashboard-probe"),
        ]
        return extra + original()

    site.get_urls = get_urls  # type: ignore[method-assign]
    site._vx11_dashboard = True  # type: ignore[attr-defined]


def live_badge_columns() -> list[Callable[[Any], Any]]:
    """Health and breaker badge columns for the module list, read once per page.

    ``ModuleAdmin.get_list_display`` puts these in its list: the breaker is read
    live (SPEC §6: an open breaker past its timeout reads half-open), the health
    from the last stored probe.
    """
    breakers = {name: {**s.as_dict(), "forced": s.forced} for name, s in breaker_statuses().items()}
    health = health_rows()

    @admin.display(description="Health")
    def health_badge(obj: Any) -> Any:
        row = health.get(obj.name)
        if row is None:
            return badge("unknown", "idle")
        text = row["status"]
        if row["status"] == "up" and row["latency_ms"] is not None:
            text += f" · {row['latency_ms']:.0f} ms"
        elif row["status"] == "degraded" and row["last_error"]:
            text += " · " + row["last_error"].split(":", 1)[0]  # "1 of 3 targets down"
        return badge(text, HEALTH_TONES.get(row["status"], "idle"))

    @admin.display(description="Breaker state")
    def breaker_badge(obj: Any) -> Any:
        state = breakers.get(obj.name)
        if state is None:
            return badge("unknown", "idle")
        text = breaker_label(state)
        if state["failure_count"]:
            text += f" · {state['failure_count']} failures"
        return badge(text, BREAKER_TONES.get(state["state"], "idle"))

    return [health_badge, breaker_badge]
