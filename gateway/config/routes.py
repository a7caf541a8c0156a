"""The route table: intents, the code defaults, and the effective table with overrides."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import quote

from gateway.config import fallbacks
from gateway.config.fallbacks import Fallback
from gateway.config.shapes import ROUTE_FIELDS, RouteFields


class IntentType(StrEnum):
    CHAT = "chat"
    CODE = "code"
    AUDIO = "audio"
    ANALYSIS = "analysis"
    TASK = "task"
    SPAWN = "spawn"
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class RouteConfig(RouteFields):
    """Where an intent goes and how it is treated on the way."""

    intent: str = ""
    enabled: bool = True
    source: str = "code"  # code | database

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, ``intent`` first (the API's and the admin's entry)."""
        entry = {name: getattr(self, name) for name in ROUTE_KEYS}
        entry["fallbacks"] = [option.as_dict() for option in self.fallbacks]
        return entry


#: The members of an effective route, in the order the API shows them.
ROUTE_KEYS: tuple[str, ...] = (
    "intent",
    *(f.name for f in fields(RouteConfig) if f.name != "intent"),
)


#: Chat and code fall back to madre's chat, as the original gateway did when switch was offline.
MADRE_CHAT = (Fallback("madre", "/madre/chat", "POST"),)

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
            fallbacks=MADRE_CHAT,
            intent=IntentType.CHAT,
        ),
        RouteConfig(
            "switch",
            "/switch/route-v5",
            "POST",
            20,
            "Code generation through the switch",
            context7=True,
            fallbacks=MADRE_CHAT,
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
OVERRIDABLE = ROUTE_FIELDS


class RouteRow(Protocol):
    """A ``gateway.models.Route`` row as the overlay reads it (its fields in ``OVERRIDABLE``)."""

    @property
    def intent(self) -> str: ...
    @property
    def enabled(self) -> bool: ...


#: Every printable ASCII character is kept as it is (``%`` too: existing escapes stay).
_PRINTABLE_ASCII = "".join(map(chr, range(33, 127)))


def wire_path(endpoint: str) -> str:
    """An endpoint as it can be written upstream: anything outside printable ASCII
    percent-encoded (UTF-8). Writes are validated, so this only repairs a row stored
    before that validation (or by raw SQL); it runs when the snapshot is built."""
    return quote(endpoint, safe=_PRINTABLE_ASCII)


def overlay(row: RouteRow) -> RouteConfig:
    """The effective route of one override row: its non-empty fields over the code route."""
    base = CODE_ROUTES.get(row.intent) or RouteConfig(module="", endpoint="", intent=row.intent)
    changes: dict[str, Any] = {}
    for name in OVERRIDABLE:
        value = getattr(row, name)
        if value is not None and value != "":
            changes[name] = value
    if "endpoint" in changes:
        changes["endpoint"] = wire_path(changes["endpoint"])
    primary = changes.get("module", base.module)
    if "fallbacks" in changes:  # the stored JSON list, parsed once per snapshot
        changes["fallbacks"] = fallbacks.parse(changes["fallbacks"], primary, wire_path)
    elif base.fallbacks:  # inherited: never the route's own (overridden) module
        changes["fallbacks"] = fallbacks.without(base.fallbacks, primary)
    return replace(base, **changes, intent=row.intent, enabled=row.enabled, source="database")


def build_routes(rows: Iterable[RouteRow]) -> dict[str, RouteConfig]:
    table = dict(CODE_ROUTES)
    for row in rows:
        table[row.intent] = overlay(row)
    return table
