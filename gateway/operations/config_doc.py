"""The configuration as one document (SPEC §21): build it from the rows, read and validate one.

A document has up to three sections, each a mapping by name::

    modules:  {switch: {url: http://10.0.0.5:8002, failure_threshold: 3, max_concurrent: 16}}
    modules:  {switch: {lb: round_robin, targets: [{url: http://10.0.0.5:8002, weight: 50}]}}
    routes:   {chat: {timeout: 30}, summarise: {module: madre, endpoint: /madre/sum}}
    clients:  {ci: {admin: false, active: true, rate_limit: 100}}

An entry describes its whole row: an omitted field is the column's default (empty: inherit
the env or code value). ``routes`` lists the ``Route`` rows only — overrides and added intents;
an unchanged code route has no row and is not listed. ``clients`` never carries a token or its
hash. A section left out of the document is not managed by it (nothing there is changed or
pruned), as decK does with a file that selects only some entities.

Validation reuses the models' own checks (``full_clean``: the field validators of
``gateway.config.validation`` and ``Module.clean`` / ``Route.clean``) on unsaved rows, and
reports every error with its path (``routes.chat.timeout: ...``). ``config_apply`` diffs and
writes. A module entry's ``targets`` (its ``Target`` rows) are read and written by
``config_targets``, which says what a list replaces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.db import models

from gateway.config import fallbacks
from gateway.config.modules import CODE_MODULES, TargetInfo, env_overrides
from gateway.config.routes import CODE_ROUTES, OVERRIDABLE
from gateway.config.shapes import MODULE_FIELDS
from gateway.models import ApiClient, Module, Route, Target
from gateway.operations import config_targets, config_values

SECTIONS: tuple[str, ...] = ("modules", "routes", "clients")
#: The document's keys per section, and the model column each one is.
COLUMNS: dict[str, dict[str, str]] = {
    "modules": {
        "url": "url",
        "health_path": "health_path",
        "enabled": "enabled",
        **{name: name for name in MODULE_FIELDS},  # breaker settings, max_concurrent
    },
    "routes": {**{name: name for name in OVERRIDABLE}, "enabled": "enabled"},
    "clients": {
        "admin": "is_admin",
        "active": "active",
        "rate_limit": "rate_limit",
        "protected_rate_limit": "protected_rate_limit",
    },
}
MODELS: dict[str, type[models.Model]] = {"modules": Module, "routes": Route, "clients": ApiClient}
KEY_COLUMN: dict[str, str] = {"modules": "name", "routes": "intent", "clients": "name"}
#: Keys written even when they hold the default (a client's flags are worth reading).
ALWAYS: dict[str, tuple[str, ...]] = {"clients": ("admin", "active")}


class DocumentError(Exception):
    """The document is invalid: every error, each ``path: message``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def default_of(model: type[models.Model], column: str) -> Any:
    """What a column holds when the document leaves its key out."""
    f = model._meta.get_field(column)
    assert isinstance(f, models.Field)
    if f.has_default():
        return f.get_default()
    return None if f.null else ""


def row_values(section: str, row: models.Model) -> dict[str, Any]:
    """A row's document keys and values (every key, defaults included)."""
    return {key: getattr(row, column) for key, column in COLUMNS[section].items()}


def entry_of(section: str, row: models.Model) -> dict[str, Any]:
    """A row as its document entry: the keys that differ from the default (and ``ALWAYS``)."""
    model = MODELS[section]
    always = ALWAYS.get(section, ())
    return {
        key: value
        for key, value in row_values(section, row).items()
        if key in always or value != default_of(model, COLUMNS[section][key])
    }


def build_document() -> dict[str, Any]:
    """The whole managed configuration, read now from the database."""
    doc: dict[str, Any] = {}
    for section in SECTIONS:
        key = KEY_COLUMN[section]
        rows = MODELS[section]._default_manager.order_by(key)
        doc[section] = {getattr(row, key): entry_of(section, row) for row in rows}
    for name, items in config_targets.export_targets().items():
        if name in doc["modules"]:
            doc["modules"][name]["targets"] = items
    return doc


def dump(doc: dict[str, Any], fmt: str = "yaml") -> str:
    """The document as YAML (``safe_dump``, keys in document order) or JSON."""
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    return str(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False))


def parse(text: str | bytes) -> dict[str, Any]:
    """A document from YAML or JSON text (JSON is YAML); a bad one is a ``DocumentError``."""
    try:
        loaded = config_values.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DocumentError([f"document: not valid YAML or JSON{where}: {problem}"]) from exc
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise DocumentError(
            [f"document: must be a mapping of sections, not {type(loaded).__name__}"]
        )
    return loaded


@dataclass
class Planned:
    """A validated document: the rows it wants, by section and name (unsaved where new)."""

    rows: dict[str, dict[str, models.Model]] = field(default_factory=dict)
    existing: dict[str, dict[str, models.Model]] = field(default_factory=dict)
    #: The modules whose entry lists ``targets``: the whole list each wants, and the rows
    #: every module has now.
    targets: dict[str, tuple[TargetInfo, ...]] = field(default_factory=dict)
    stored_targets: dict[str, list[Target]] = field(default_factory=dict)


def _messages(exc: ValidationError) -> dict[str, list[str]]:
    if hasattr(exc, "error_dict"):
        return {
            name: [str(m) for m in ValidationError(errs).messages]
            for name, errs in exc.error_dict.items()
        }
    return {"": [str(m) for m in exc.messages]}


def _row_for(
    section: str, name: str, entry: dict[str, Any], existing: models.Model | None
) -> models.Model:
    model = MODELS[section]
    row = existing if existing is not None else model(**{KEY_COLUMN[section]: name})
    if existing is not None:  # a copy: the diff compares it with the stored row
        row = model._default_manager.get(pk=existing.pk)
    for key, column in COLUMNS[section].items():
        value = entry.get(key, default_of(model, column))
        if column == "method" and isinstance(value, str):
            value = value.upper()
        setattr(row, column, value)
    if section == "clients" and existing is None:
        assert isinstance(row, ApiClient)
        row.set_new_token()  # the real token is made again when it is created
    return row


def _typed(section: str, entry: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The entry with ``null`` values and values of the wrong kind left out (the column's
    default stands in), and the second: ``{key: why}`` (``config_values.value_error``)."""
    model = MODELS[section]
    kept: dict[str, Any] = {}
    wrong: dict[str, str] = {}
    for key, value in entry.items():
        column = COLUMNS[section].get(key)
        if column is None or value is None:
            continue
        found = config_values.value_error(model._meta.get_field(column), value)  # type: ignore[arg-type]
        if found is None:
            kept[key] = value
        else:
            wrong[key] = found
    return kept, wrong


def _check_entry(
    section: str, name: Any, entry: Any, existing: models.Model | None, modules: set[str]
) -> tuple[models.Model | None, list[str]]:
    """One entry's row and its errors (``section.name.key: message``)."""
    where = f"{section}.{name}"
    if not isinstance(name, str):
        return None, [f"{where}: the name must be text"]
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        return None, [f"{where}: must be a mapping of fields, not {type(entry).__name__}"]
    errors = [f"{where}.{key}: unknown field" for key in entry if key not in COLUMNS[section]]
    entry, wrong = _typed(section, entry)
    errors.extend(f"{where}.{key}: {message}" for key, message in wrong.items())
    row = _row_for(section, name, entry, existing)
    exclude = ["module"] if section == "routes" else []
    exclude += [COLUMNS[section][key] for key in wrong]  # reported already
    try:
        row.full_clean(exclude=exclude, validate_unique=existing is None)
    except (TypeError, ValueError) as exc:  # a model check that met a value it can't compare
        errors.append(f"{where}: {exc}")
    except ValidationError as exc:
        keys = {column: key for key, column in COLUMNS[section].items()}
        for column, msgs in _messages(exc).items():
            if section == "routes" and column == "module":  # checked below, with the document's
                msgs = [m for m in msgs if not m.startswith("Unknown module")]
            if section == "routes" and column == "fallbacks":  # modules: also checked below
                msgs = [m for m in msgs if fallbacks.UNKNOWN_MODULE not in m]
            path = (
                f"{where}.{keys.get(column, column)}" if column and column != "__all__" else where
            )
            errors.extend(f"{path}: {m}" for m in msgs)
    if section == "routes":
        errors.extend(_check_route_module(where, row, modules))
        errors.extend(_check_route_fallbacks(where, row, modules))
    return row, errors


def _check_route_fallbacks(where: str, row: models.Model, modules: set[str]) -> list[str]:
    """The fallbacks' modules against the modules the document leaves (``Route.clean``
    knew only the stored ones); a valid list is stored in its canonical form."""
    assert isinstance(row, Route)
    if not row.fallbacks:
        return []
    base = CODE_ROUTES.get(row.intent)
    primary = row.module or (base.module if base else "")
    found = fallbacks.fallback_errors(row.fallbacks, primary, modules)
    if not found:
        row.fallbacks = fallbacks.normalise(row.fallbacks)
    return [f"{where}.fallbacks: {m}" for m in found if fallbacks.UNKNOWN_MODULE in m]


def _check_route_module(where: str, row: models.Model, modules: set[str]) -> list[str]:
    assert isinstance(row, Route)
    if not row.module:
        return []
    try:
        Route._meta.get_field("module").clean(row.module, row)
    except ValidationError as exc:
        return [f"{where}.module: {m}" for m in exc.messages]
    if row.module not in modules:
        return [f"{where}.module: Unknown module {row.module!r}."]
    return []


def _module_names(doc: dict[str, Any], prune: bool) -> set[str]:
    """The modules that will exist once the document is applied."""
    names = set(CODE_MODULES) | set(env_overrides()[0])
    listed = doc.get("modules")
    if isinstance(listed, dict):
        names.update(n for n in listed if isinstance(n, str))
    if not (prune and isinstance(listed, dict)):
        names.update(Module.objects.values_list("name", flat=True))
    return names


def validate(doc: dict[str, Any], *, prune: bool = False) -> Planned:
    """Check the whole document; every error at once as a ``DocumentError``."""
    errors = [
        f"{key}: unknown section (expected {', '.join(SECTIONS)})"
        for key in doc
        if key not in SECTIONS
    ]
    modules = _module_names(doc, prune)
    planned = Planned()
    for section in SECTIONS:
        if section not in doc:
            continue
        entries = doc[section]
        if entries is None:
            entries = {}
        if not isinstance(entries, dict):
            errors.append(f"{section}: must be a mapping by name, not {type(entries).__name__}")
            continue
        key = KEY_COLUMN[section]
        stored = {getattr(r, key): r for r in MODELS[section]._default_manager.all()}
        planned.existing[section] = stored
        if section == "modules":
            planned.stored_targets = config_targets.stored_targets()
        planned.rows[section] = {}
        for name, listed in entries.items():
            entry = _split_targets(planned, section, name, listed, errors)
            row, found = _check_entry(section, name, entry, stored.get(name), modules)
            errors.extend(found)
            if row is not None:
                planned.rows[section][name] = row
    errors.extend(_orphans(doc, modules, prune))
    if errors:
        raise DocumentError(errors)
    return planned


def _split_targets(planned: Planned, section: str, name: Any, entry: Any, errors: list[str]) -> Any:
    """A module entry without its ``targets``, which go to ``planned.targets`` once checked."""
    if section != "modules" or not isinstance(entry, dict) or entry.get("targets") is None:
        return entry
    found, problems = config_targets.check_targets(f"modules.{name}.targets", entry["targets"])
    errors.extend(problems)
    if found is not None and isinstance(name, str):
        planned.targets[name] = found
    return {key: value for key, value in entry.items() if key != "targets"}


def _orphans(doc: dict[str, Any], modules: set[str], prune: bool) -> list[str]:
    """Stored routes the document keeps (it does not list them, and does not prune them)
    whose module or fallback module the document removes."""
    listed = doc.get("routes")
    if isinstance(listed, dict) and prune:
        return []  # every stored route is listed (and checked) or removed
    keep = Route.objects.exclude(intent__in=list(listed) if isinstance(listed, dict) else [])
    errors: list[str] = []
    for row in keep:
        used: list[object] = [row.module] if row.module else []
        if isinstance(row.fallbacks, list):
            used += [f.get("module") for f in row.fallbacks if isinstance(f, dict)]
        errors.extend(
            f"routes.{row.intent}: module {name!r} is removed by this document "
            "(list the route, or keep the module)"
            for name in used
            if isinstance(name, str) and name and name not in modules
        )
    return errors
