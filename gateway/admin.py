"""Django admin for the gateway: modules, routes (effective table), API clients, history."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Model
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from gateway.config.modules import target_key
from gateway.config.routes import CODE_ROUTES, OVERRIDABLE
from gateway.config.shapes import BREAKER_FIELDS
from gateway.console import dashboard
from gateway.console.dashboard import badge, live_badge_columns
from gateway.core.conf import gw
from gateway.core.problems import GatewayError
from gateway.models import (
    ApiClient,
    BreakerState,
    BreakerTransition,
    Module,
    ModuleHealth,
    Route,
    Target,
)
from gateway.operations import configuration
from gateway.operations import health as healthcheck
from gateway.operations.breakers import force_many
from gateway.operations.cache import clear_cache_sync


class TargetFormSet(forms.BaseInlineFormSet):  # type: ignore[type-arg]
    """No two targets of the page at one ``host:port`` (each row's check sees only the saved)."""

    def clean(self) -> None:
        super().clean()
        seen: set[str] = set()
        for form in self.forms:
            url = form.cleaned_data.get("url") if form.cleaned_data else None
            if not url or form.cleaned_data.get("DELETE"):
                continue
            key = target_key(url)
            if key in seen:
                raise forms.ValidationError(f"Two targets at {key}.")
            seen.add(key)


class TargetInline(admin.TabularInline[Target, Module]):
    """The module's targets (SPEC §18): with any, they replace its URL, the env's and the code's."""

    model = Target
    formset = TargetFormSet
    fields = ["url", "weight", "enabled"]
    extra = 0
    verbose_name_plural = "Targets (replicas; with any, they replace the URL above)"


@admin.register(Module)
class ModuleAdmin(admin.ModelAdmin[Module]):
    list_display = ["name", "effective_url", "enabled", "health_path", "breaker_settings"]
    inlines = [TargetInline]
    list_filter = ["enabled"]
    search_fields = ["name", "url"]
    readonly_fields = ["updated_at", "defaults_note"]
    actions = [
        "breaker_reset",
        "breaker_force_open",
        "breaker_force_closed",
        "breaker_auto",
        "probe_now",
    ]
    fieldsets = [
        (None, {"fields": ["name", "url", "defaults_note", "health_path", "enabled", "lb"]}),
        (
            "Circuit breaker (empty = VX11_CB_* defaults)",
            {"fields": list(BREAKER_FIELDS)},
        ),
        (
            "Bulkhead (empty = VX11_MODULE_<NAME>_MAX_CONCURRENT; 0 = only VX11_MAX_INFLIGHT)",
            {"fields": ["max_concurrent"]},
        ),
        (None, {"fields": ["updated_at"]}),
    ]

    def get_list_display(self, request: HttpRequest) -> Any:
        """Live health and breaker badges beside the settings (read once per page)."""
        return [
            "name",
            "effective_url",
            "target_count",
            "enabled",
            *live_badge_columns(),
            "health_path",
            "breaker_settings",
        ]

    def get_queryset(self, request: HttpRequest) -> Any:
        return super().get_queryset(request).annotate(n_targets=Count("targets"))

    @admin.display(description="URL in use")
    def effective_url(self, obj: Module) -> str:
        if getattr(obj, "n_targets", 0):
            return "its targets"
        return configuration.module_url(obj.name, obj.url)

    @admin.display(description="Targets", ordering="n_targets")
    def target_count(self, obj: Module) -> int:
        return int(getattr(obj, "n_targets", 0))

    @admin.display(description="Code default / env")
    def defaults_note(self, obj: Module) -> str:
        code, env = configuration.module_defaults(obj.name)
        return f"code: {code or '—'}; env: {env or '—'}"

    @admin.display(description="Breaker")
    def breaker_settings(self, obj: Module) -> str:
        parts = []
        if obj.failure_threshold:
            parts.append(f"trip after {obj.failure_threshold}")
        if obj.recovery_timeout is not None:
            parts.append(f"recover {obj.recovery_timeout:g}s")
        if obj.failure_rate_threshold is not None:
            parts.append(f"rate ≥ {obj.failure_rate_threshold:g}")
        return ", ".join(parts) or "defaults"

    def _breaker(self, request: HttpRequest, queryset: Any, action: str) -> None:
        """The same call as ``POST /vx11/circuit-breaker/{module}`` (gateway.operations.breakers)."""
        table = configuration.module_table()
        try:
            done = [
                f"{name} → {status.state}"
                for name, status in force_many([m.name for m in queryset], action, table)
            ]
        except Exception as exc:
            self.message_user(request, f"Breaker {action} failed: {exc!r}", messages.ERROR)
            return
        self.message_user(request, f"Breaker {action}: {', '.join(done)}.", messages.SUCCESS)

    @admin.action(description="Breaker: reset (closed, counters cleared)")
    def breaker_reset(self, request: HttpRequest, queryset: Any) -> None:
        self._breaker(request, queryset, "reset")

    @admin.action(description="Breaker: force open (refuse every call)")
    def breaker_force_open(self, request: HttpRequest, queryset: Any) -> None:
        self._breaker(request, queryset, "force_open")

    @admin.action(description="Breaker: force closed (admit every call)")
    def breaker_force_closed(self, request: HttpRequest, queryset: Any) -> None:
        self._breaker(request, queryset, "force_closed")

    @admin.action(description="Breaker: back to automatic")
    def breaker_auto(self, request: HttpRequest, queryset: Any) -> None:
        self._breaker(request, queryset, "auto")

    @admin.action(description="Probe health now")
    def probe_now(self, request: HttpRequest, queryset: Any) -> None:
        table = configuration.module_table()
        for m in queryset:
            if m.name not in table:
                continue
            result, state = healthcheck.probe_now(table[m.name])
            if result.ok:
                self.message_user(
                    request, f"{m.name}: up ({result.latency_ms:g} ms).", messages.SUCCESS
                )
            else:
                self.message_user(
                    request,
                    f"{m.name}: down — {result.error} "
                    f"({state.consecutive_failures} failure(s) in a row).",
                    messages.WARNING,
                )


#: The route form's help for the fields whose model help is short (SPEC §19).
ROUTE_HELP = {
    "fallbacks": (
        "JSON list, tried in order when the module cannot answer (at most 3, each another "
        'module): [{"module": "madre", "endpoint": "/madre/chat", "method": "POST"}]. '
        "The method is optional (the route's). Empty: the code default's; [] turns them off."
    ),
    "fallback_on": (
        "Comma list of triggers: circuit_open, overloaded, unavailable, timeout, 5xx, 429. "
        "Empty: all but 429. Never a 4xx, never once the answer has started."
    ),
}


@admin.register(Route)
class RouteAdmin(admin.ModelAdmin[Route]):
    """Overrides are edited here; the code defaults are shown beside them, read-only."""

    list_display = ["intent", "module", "endpoint", "method", "timeout", "enabled", "kind"]
    list_filter = ["enabled", "module"]
    search_fields = ["intent", "module", "endpoint"]
    readonly_fields = ["code_default", "updated_at"]
    fields = ["intent", "code_default", *OVERRIDABLE, "enabled", "updated_at"]
    change_list_template = "admin/gateway/route/change_list.html"

    @admin.display(description="Kind")
    def kind(self, obj: Route) -> SafeString:
        if obj.intent in CODE_ROUTES:
            return badge("override", "warn")
        return badge("new intent", "ok")

    @admin.display(description="Code default (empty fields inherit it)")
    def code_default(self, obj: Route) -> str:
        base = CODE_ROUTES.get(obj.intent)
        if base is None:
            return "— (a new intent: module and endpoint are required)"
        chain = ", then ".join(f"{f.module} {f.method} {f.endpoint}" for f in base.fallbacks)
        return (
            f"{base.module} {base.method} {base.endpoint}, timeout {base.timeout:g}s, "
            f"priority {base.priority}, protected {base.protected}, streaming "
            f"{base.streaming}, context7 {base.context7}, "
            f"fallbacks: {chain or 'none'}"
            + (  # SPEC §20: timeout bounds the head; these the body
                f", idle_timeout {base.idle_timeout:g}s, max_duration {base.max_duration:g}s"
                if base.streaming
                else ""
            )
        )

    def get_form(
        self, request: HttpRequest, obj: Route | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm[Route]]:
        kwargs["help_texts"] = {**ROUTE_HELP, **kwargs.get("help_texts", {})}
        return super().get_form(request, obj, change, **kwargs)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> Any:
        table = configuration.effective_routes()
        extra = {"effective_routes": [table[k] for k in sorted(table)]}
        return super().changelist_view(request, {**(extra_context or {}), **extra})


@admin.register(ApiClient)
class ApiClientAdmin(admin.ModelAdmin[ApiClient]):
    list_display = [
        "name",
        "token_prefix",
        "is_admin",
        "status",
        "rate_limit",
        "protected_rate_limit",
        "created_at",
    ]
    list_filter = ["active", "is_admin"]
    search_fields = ["name", "token_prefix"]
    readonly_fields = ["token_prefix", "created_at", "revoked_at", "updated_at"]
    fields = [
        "name",
        "is_admin",
        "active",
        "rate_limit",
        "protected_rate_limit",
        "token_prefix",
        "created_at",
        "revoked_at",
    ]
    actions = ["revoke", "rotate_token"]

    @admin.display(description="Status")
    def status(self, obj: ApiClient) -> SafeString:
        return badge("active", "ok") if obj.active else badge("revoked", "bad")

    def save_model(self, request: HttpRequest, obj: ApiClient, form: Any, change: bool) -> None:
        token = None
        if not change:
            token = obj.set_new_token()
        super().save_model(request, obj, form, change)
        if token:
            messages.warning(
                request,
                format_html(
                    'Token for <b>{}</b> (shown once, copy it now): <code id="new-token">{}</code>',
                    obj.name,
                    token,
                ),
            )

    @admin.action(description="Revoke selected clients")
    def revoke(self, request: HttpRequest, queryset: Any) -> None:
        count = 0
        for client in queryset:
            client.active = False
            client.revoked_at = timezone.now()
            client.save(update_fields=["active", "revoked_at", "updated_at"])
            count += 1
        self.message_user(request, f"Revoked {count} client(s).", messages.SUCCESS)

    @admin.action(description="Issue a new token (the old one stops working)")
    def rotate_token(self, request: HttpRequest, queryset: Any) -> None:
        for client in queryset:
            token = client.set_new_token()
            client.save()
            messages.warning(
                request,
                format_html(
                    "New token for <b>{}</b> (shown once): <code>{}</code>", client.name, token
                ),
            )


class ReadOnlyAdmin[M: Model](admin.ModelAdmin[M]):
    """History and live-state tables: written by the gateway, never by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(BreakerTransition)
class BreakerTransitionAdmin(ReadOnlyAdmin[BreakerTransition]):
    list_display = ["at", "module", "from_state", "to_state", "reason"]
    list_filter = ["module", "to_state", "reason"]
    date_hierarchy = "at"


@admin.register(BreakerState)
class BreakerStateAdmin(ReadOnlyAdmin[BreakerState]):
    list_display = [
        "module",
        "state",
        "forced",
        "failure_count",
        "last_failure",
        "opened_at",
        "updated_at",
    ]
    list_filter = ["state"]


@admin.register(ModuleHealth)
class ModuleHealthAdmin(ReadOnlyAdmin[ModuleHealth]):
    list_display = [
        "module",
        "status",
        "latency_ms",
        "last_check",
        "consecutive_failures",
        "last_error",
    ]
    list_filter = ["status"]
    change_list_template = "admin/gateway/modulehealth/change_list.html"  # + cache-clear button

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.clear_cache_view)
        return [path("clear-cache/", view, name="gateway_cache_clear"), *super().get_urls()]

    def clear_cache_view(self, request: HttpRequest) -> HttpResponse:
        """A confirmation form whose POST clears the cache (staff only, CSRF-checked)."""
        if request.method == "POST":
            try:
                deleted = clear_cache_sync("admin")
            except GatewayError as exc:
                messages.error(request, exc.detail)
            else:
                messages.success(request, f"Gateway cache cleared: {deleted} key(s) deleted.")
            return HttpResponseRedirect(reverse("admin:index"))
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "title": "Clear the gateway cache",
            "cache_ttl": gw.cache_ttl_health,
            "shared": bool(gw.redis_url),
        }
        return TemplateResponse(request, "admin/gateway/cache_clear.html", context)


# The live dashboard (/admin/dashboard/) and its session endpoints: gateway/console/dashboard.py.
dashboard.install(admin.site)

# Branding (SPEC §14): every admin page says "VX11 Gateway"; "View site" opens the API docs.
admin.site.site_header = "VX11 Gateway"
admin.site.site_title = "VX11 Gateway"
admin.site.index_title = "Gateway administration"
admin.site.site_url = "/docs"
# The app list on every page takes ~280 px: lists get the width (the index lists the models).
admin.site.enable_nav_sidebar = False
