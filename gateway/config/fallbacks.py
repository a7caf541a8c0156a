"""A route's fallback chain (SPEC §19): its options, its triggers, and their validation.

A route may list ``fallbacks``, an ordered list of ``{module, endpoint, method?}`` tried in
order when the route's own module cannot answer, and ``fallback_on``, the triggers that
move on to the next option (a comma list; empty: every trigger but ``429``). The stored
form is JSON (``Route.fallbacks``); the snapshot carries it parsed, as a tuple of
:class:`Fallback` (``gateway.config.routes.overlay``), so the request path parses nothing.

Validation (:func:`fallback_errors`, :func:`fallback_on_error`) is shared by the model's
``clean`` (admin, declarative config) and the API's serializer.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.core.exceptions import ValidationError

from gateway.config.validation import METHODS, validate_endpoint, validate_module_name

log = logging.getLogger("gateway.routes")

#: At most this many fallbacks per route.
MAX_FALLBACKS = 3
#: Every trigger, in the order they are shown (``5xx``: a status of the breaker's failure set).
TRIGGERS: tuple[str, ...] = ("circuit_open", "overloaded", "unavailable", "timeout", "5xx", "429")
#: ``fallback_on`` left empty: everything but ``429`` (a 429 usually means *slow down*,
#: which another module may not need to hear — opt in when it does).
DEFAULT_TRIGGERS: frozenset[str] = frozenset(TRIGGERS) - {"429"}
_KEYS = frozenset({"module", "endpoint", "method"})
#: In the message of a fallback naming a module that does not exist (the declarative
#: config checks modules against the document's own, and filters the model's message).
UNKNOWN_MODULE = ": unknown module "


@dataclass(frozen=True, slots=True)
class Fallback:
    """One option of a chain: where the request goes when the options before it failed.

    ``method`` empty: the route's own method."""

    module: str
    endpoint: str
    method: str = ""

    def as_dict(self) -> dict[str, str]:
        """The stored and shown form (``method`` only when set)."""
        out = {"module": self.module, "endpoint": self.endpoint}
        if self.method:
            out["method"] = self.method
        return out


@lru_cache(maxsize=64)
def triggers(fallback_on: str) -> frozenset[str]:
    """The triggers a ``fallback_on`` value names (empty: :data:`DEFAULT_TRIGGERS`).

    Cached: the request path asks with the route's string only when an option failed.
    Unknown names are ignored here (validation refuses them on every write)."""
    names = {part.strip() for part in fallback_on.split(",") if part.strip()}
    return frozenset(names & set(TRIGGERS)) if names else DEFAULT_TRIGGERS


def normalise_fallback_on(value: str) -> str:
    """``fallback_on`` in its canonical form (known names, the order of :data:`TRIGGERS`)."""
    names = {part.strip() for part in value.split(",") if part.strip()}
    return ",".join(name for name in TRIGGERS if name in names)


def fallback_on_error(value: str | None) -> str | None:
    """Why a ``fallback_on`` value is refused (``None``: it is fine)."""
    if not value:
        return None
    names = [part.strip() for part in value.split(",")]
    unknown = [name for name in names if name not in TRIGGERS]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown)
        return f"Unknown trigger(s) {shown}; use a comma list of {', '.join(TRIGGERS)}."
    return None


def _option_errors(i: int, item: Any, known: Collection[str]) -> tuple[list[str], str | None]:
    """The errors of option ``i`` and its module name (``None``: not a usable name)."""
    where = f"Fallback {i + 1}"
    if not isinstance(item, dict):
        return [f'{where} must be an object like {{"module": "madre", "endpoint": "/x"}}.'], None
    errors = [f"{where}: unknown key {key!r}." for key in sorted(set(item) - _KEYS)]
    module, endpoint, method = item.get("module"), item.get("endpoint"), item.get("method", "")
    name: str | None = None
    if not isinstance(module, str) or not module:
        errors.append(f"{where} needs a module.")
    else:
        try:
            name = validate_module_name(module)
        except ValidationError as exc:
            errors.extend(f"{where}: {m}" for m in exc.messages)
        if name is not None and name not in known:
            shown = ", ".join(sorted(known))
            errors.append(f"{where}{UNKNOWN_MODULE}{module!r} (known: {shown}).")
    if not isinstance(endpoint, str) or not endpoint:
        errors.append(f"{where} needs an endpoint (a path on the module, e.g. /madre/chat).")
    else:
        try:
            validate_endpoint(endpoint)
        except ValidationError as exc:
            errors.extend(f"{where}: {m}" for m in exc.messages)
    if method and (not isinstance(method, str) or method.upper() not in METHODS):
        errors.append(f"{where}: method must be one of {', '.join(METHODS)}.")
    return errors, name


def fallback_errors(value: Any, primary: str, known: Collection[str]) -> list[str]:
    """Why a ``fallbacks`` value is refused (empty: it is fine).

    ``value``: the JSON list (``None``: inherited, fine); ``primary``: the route's effective
    module, which no fallback may repeat; ``known``: the modules that exist. No module may
    appear twice either: the options of one module share its breaker and bulkhead, so a
    second one would only be refused the same way (its retries are the module's own).
    """
    if value is None:
        return []
    if not isinstance(value, list):
        return ['Fallbacks must be a list like [{"module": "madre", "endpoint": "/madre/chat"}].']
    if len(value) > MAX_FALLBACKS:
        return [f"At most {MAX_FALLBACKS} fallbacks (got {len(value)})."]
    errors: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        found, name = _option_errors(i, item, known)
        errors.extend(found)
        if name is None:
            continue
        if name == primary:
            errors.append(f"Fallback {i + 1} repeats the route's own module {name!r}.")
        elif name in seen:
            errors.append(f"Fallback {i + 1} repeats module {name!r} (one option per module).")
        seen.add(name)
    return errors


def normalise(value: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A valid ``fallbacks`` list in its stored form (methods upper-case, no empty method)."""
    return [parse_one(item).as_dict() for item in value]


def parse_one(item: dict[str, Any]) -> Fallback:
    method = str(item.get("method") or "").upper()
    return Fallback(str(item["module"]), str(item["endpoint"]), method)


def parse(value: Any, primary: str, wire: Any) -> tuple[Fallback, ...]:
    """The stored list as the snapshot carries it: invalid options (a row written before
    validation, or by raw SQL) and options repeating ``primary`` are left out, logged.

    ``wire``: how an endpoint is written upstream (``gateway.config.routes.wire_path``)."""
    if not isinstance(value, list):
        return ()
    out: list[Fallback] = []
    for item in value[:MAX_FALLBACKS]:
        if isinstance(item, dict) and isinstance(item.get("endpoint"), str):
            item = {**item, "endpoint": wire(item["endpoint"])}
        found, name = _option_errors(0, item, _Anything())
        if found or name is None or name == primary or any(f.module == name for f in out):
            log.error("ignoring an invalid fallback", extra={"fallback": repr(item)[:200]})
            continue
        out.append(parse_one(item))
    return tuple(out)


def without(options: tuple[Fallback, ...], primary: str) -> tuple[Fallback, ...]:
    """``options`` minus any for ``primary`` (an inherited chain of a route whose module
    was overridden to one of its fallbacks)."""
    return tuple(f for f in options if f.module != primary)


class _Anything(Collection[str]):
    """Every module name (the snapshot checks modules at request time, not here)."""

    def __contains__(self, item: object) -> bool:
        return True

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0
