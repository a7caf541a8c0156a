"""Admin for Context-7 sessions: read-only history, TTL left, an "expire now" action."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.safestring import SafeString

from gateway.console.dashboard import badge
from sessions_ctx7 import services
from sessions_ctx7.models import Message, Session


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class ExpiredFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "expired"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "Alive"), ("yes", "Expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = timezone.now()
        if self.value() == "yes":
            return queryset.filter(expires_at__lte=now)
        if self.value() == "no":
            return queryset.filter(expires_at__gt=now)
        return queryset


class MessageInline(admin.TabularInline[Message, Session]):
    model = Message
    fields = ["seq", "role", "content", "metadata", "created_at"]
    readonly_fields = ["seq", "role", "content", "metadata", "created_at"]
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Session | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Session | None = None) -> bool:
        return False


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin[Session]):
    list_display = [
        "short_id",
        "client",
        "topic",
        "message_count",
        "last_activity",
        "ttl_left",
        "state",
    ]
    list_display_links = ["short_id"]
    list_per_page = 50
    list_filter = [ExpiredFilter, "topic"]
    search_fields = ["session_id", "client", "messages__content"]
    readonly_fields = [
        "session_id",
        "client",
        "topic",
        "message_count",
        "created_at",
        "last_activity",
        "expires_at",
        "ttl_left",
        "summary",
    ]
    fields = tuple(readonly_fields)  # everything is shown, nothing is edited by hand
    inlines = [MessageInline]
    actions = ["expire_now"]
    date_hierarchy = "last_activity"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # sessions come from traffic

    def has_change_permission(self, request: HttpRequest, obj: Session | None = None) -> bool:
        return False  # history is read-only; delete and "expire now" remain

    @admin.display(description="Session", ordering="session_id")
    def short_id(self, obj: Session) -> str:
        """The id cut to fit 1280 px (the full id is on the change page and searchable)."""
        sid = str(obj.session_id)
        return sid if len(sid) <= 20 else f"{sid[:18]}…"

    @admin.display(description="TTL left", ordering="expires_at")
    def ttl_left(self, obj: Session) -> str:
        left = services.ttl_left(obj)
        return "—" if not left else _duration(int(left.total_seconds()))

    @admin.display(description="State")
    def state(self, obj: Session) -> SafeString:
        return badge("expired", "idle") if services.is_expired(obj) else badge("alive", "ok")

    @admin.display(description="Context summary (sent upstream)")
    def summary(self, obj: Session) -> str:
        return services.summary_of(obj.recent) or "—"

    @admin.action(description="Expire now (purged by the next cleanup)", permissions=["delete"])
    def expire_now(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        count = services.expire_now(list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} session(s) expired.", messages.SUCCESS)
