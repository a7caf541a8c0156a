"""The route table: intents, the code defaults, and the effective table with overrides."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from gateway.models import Route


class IntentType(StrEnum):
    CHAT = "chat"
    CODE = "code"
    AUDIO = "audio"
    ANALYSIS = "analysis"
    TASK = "task"
    SPAWN = "spawn"
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Where an intent goes and how it is treated on the way."""

    module: str
    endpoint: str
    method: str = "POST"
    timeout: float = 30.0
    description: str = ""
    auth_required: bool = True
    priority: str = "other"  # health | analysis | other (backpressure)
    protected: bool = False  # protected rate limit scope
    streaming: bool = False  # answer streamed as it arrives
    context7: bool = False  # Context-7 session enrichment
    retry_post: bool = False  # POST retried with Idempotency-Key
    intent: str = ""
    enabled: bool = True
    source: str = "code"  # code | database

    def as_dict(self) -> dict[str, Any]:
        return {
            "intent": self.intent,
            "module": self.module,
            "endpoint": self.endpoint,
            "method": self.method,
            "timeout": self.timeout,
            "description": self.description,
            "auth_required": self.auth_required,
            "priority": self.priority,
            "protected": self.protected,
            "streaming": self.streaming,
            "context7": self.context7,
            "retry_post": self.retry_post,
            "enabled": self.enabled,
            "source": self.source,
        }


CODE_ROUTES: dict[str, RouteConfig] = {
    r.intent: r
    for r in (
        RouteConfig(
            "switch",
            "/switch/route-v5",
            "POST",
            15,
            "Chat through the switch",
            context7=True,
            intent=IntentType.CHAT,
        ),
        RouteConfig(
            "switch",
            "/switch/route-v5",
            "POST",
            20,
            "Code generation through the switch",
            context7=True,
            intent=IntentType.CODE,
        ),
        RouteConfig(
            "hermes",
            "/hermes/analyze-audio",
            "POST",
            30,
            "Audio analysis",
            protected=True,
            intent=IntentType.AUDIO,
        ),
        RouteConfig(
            "madre",
            "/madre/task",
            "POST",
            60,
            "Analysis task for madre",
            priority="analysis",
            protected=True,
            intent=IntentType.ANALYSIS,
        ),
        RouteConfig("switch", "/switch/task", "POST", 60, "Generic task", intent=IntentType.TASK),
        RouteConfig(
            "spawner",
            "/spawn",
            "POST",
            120,
            "Spawn a worker",
            protected=True,
            intent=IntentType.SPAWN,
        ),
        RouteConfig(
            "switch",
            "/switch/task",
            "POST",
            300,
            "Streamed task",
            streaming=True,
            intent=IntentType.STREAM,
        ),
    )
}

#: The fields a database ``Route`` row may override (admin form and API use the same list).
OVERRIDABLE = (
    "module",
    "endpoint",
    "method",
    "timeout",
    "description",
    "auth_required",
    "priority",
    "protected",
    "streaming",
    "context7",
    "retry_post",
)


#: Every printable ASCII character is kept as it is (``%`` too: existing escapes stay).
_PRINTABLE_ASCII = "".join(map(chr, range(33, 127)))


def wire_path(endpoint: str) -> str:
    """An endpoint as it can be written upstream: anything outside printable ASCII
    percent-encoded (UTF-8). Writes are validated, so this only repairs a row stored
    before that validation (or by raw SQL); it runs when the snapshot is built."""
    return quote(endpoint, safe=_PRINTABLE_ASCII)


def overlay(row: Route) -> RouteConfig:
    """The effective route of one override row: its non-empty fields over the code route."""
    base = CODE_ROUTES.get(row.intent) or RouteConfig(module="", endpoint="", intent=row.intent)
    changes: dict[str, Any] = {}
    for name in OVERRIDABLE:
        value = getattr(row, name)
        if value is not None and value != "":
            changes[name] = value
    if "endpoint" in changes:
        changes["endpoint"] = wire_path(changes["endpoint"])
    return replace(base, **changes, intent=row.intent, enabled=row.enabled, source="database")


def build_routes(rows: list[Route]) -> dict[str, RouteConfig]:
    table = dict(CODE_ROUTES)
    for row in rows:
        table[row.intent] = overlay(row)
    return table
