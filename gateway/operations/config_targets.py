"""A module's targets in the configuration document (SPEC §1, §21).

::

    modules:
      switch:
        lb: round_robin
        targets:
          - {url: http://10.0.0.5:8002}
          - {url: http://10.0.0.6:8002, weight: 50, enabled: false}

An entry's ``targets`` is the module's whole list: applying it adds the targets it lists,
changes their weight or enabled flag, and removes the module's other ``Target`` rows
(``targets: []`` removes them all, and the module is called at its URL, the env's or the
code's again). An entry without ``targets`` leaves the module's rows alone, with or without
``--prune`` (pruning removes whole modules, and their targets with them). Targets are matched
by URL (normalised), so their ids stay; the list's order is not significant (the rows keep
their id order). Export writes ``weight`` and ``enabled`` only when they differ from the
defaults (100, true), and no ``targets`` for a module without rows: export then import
changes nothing.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

from gateway.config.modules import TargetInfo
from gateway.models import Module, Target
from gateway.operations import config_values

#: A target item's keys (``url`` required).
TARGET_KEYS: tuple[str, ...] = ("url", "weight", "enabled")
_DEFAULTS: dict[str, Any] = {"weight": 100, "enabled": True}


def export_targets() -> dict[str, list[dict[str, Any]]]:
    """Every module's target rows as document items, by module name (one query)."""
    found: dict[str, list[dict[str, Any]]] = {}
    columns = ("module__name", "url", "weight", "enabled")
    for name, url, weight, enabled in Target.objects.order_by("id").values_list(*columns):
        item: dict[str, Any] = {"url": url}
        item.update(
            (k, v) for k, v in (("weight", weight), ("enabled", enabled)) if v != _DEFAULTS[k]
        )
        found.setdefault(name, []).append(item)
    return found


def _item(where: str, item: Any) -> tuple[TargetInfo | None, list[str]]:
    """One item of a ``targets`` list, checked like a ``Target`` row."""
    if not isinstance(item, dict):
        return None, [f"{where}: must be a mapping with url (and weight, enabled)"]
    errors = [f"{where}.{key}: unknown field" for key in item if key not in TARGET_KEYS]
    if item.get("url") is None:
        errors.append(f"{where}.url: required")
    values = {key: item[key] for key in TARGET_KEYS if item.get(key) is not None}
    for key in list(values):
        wrong = config_values.value_error(Target._meta.get_field(key), values[key])  # type: ignore[arg-type]
        if wrong is not None:
            errors.append(f"{where}.{key}: {wrong}")
            del values[key]
    if "url" not in values:
        return None, errors
    row = Target(**{**_DEFAULTS, **values})
    try:
        row.full_clean(exclude=["module"], validate_unique=False)
    except ValidationError as exc:
        for key, messages in exc.message_dict.items():
            errors.extend(f"{where}.{key}: {m}" for m in messages)
    if errors:
        return None, errors
    return TargetInfo(row.url, row.weight, row.enabled), []


def check_targets(where: str, value: Any) -> tuple[tuple[TargetInfo, ...] | None, list[str]]:
    """A module entry's ``targets`` (``where``: ``modules.<name>.targets``): the targets,
    or ``None`` and every error with its path."""
    if not isinstance(value, list):
        return None, [f"{where}: must be a list of targets, not {type(value).__name__}"]
    found: list[TargetInfo] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for n, item in enumerate(value):
        target, problems = _item(f"{where}[{n}]", item)
        errors.extend(problems)
        if target is None:
            continue
        if target.key in seen:
            errors.append(
                f"{where}[{n}].url: duplicate target {target.key} (also {where}[{seen[target.key]}])"
            )
            continue
        seen[target.key] = n
        found.append(target)
    return (None, errors) if errors else (tuple(found), [])


def stored_targets() -> dict[str, list[Target]]:
    """Every module's target rows by module name, in id order (one query)."""
    found: dict[str, list[Target]] = {}
    for row in Target.objects.select_related("module").order_by("id"):
        found.setdefault(row.module.name, []).append(row)
    return found


def _state(targets: list[Target] | tuple[TargetInfo, ...]) -> dict[str, tuple[int, bool]]:
    return {t.url: (t.weight, t.enabled) for t in targets}


def targets_differ(wanted: tuple[TargetInfo, ...], stored: list[Target]) -> bool:
    """Whether writing ``wanted`` changes the module's rows (order is not significant)."""
    return _state(wanted) != _state(stored)


def write_targets(module: Module, wanted: tuple[TargetInfo, ...], stored: list[Target]) -> None:
    """Make ``module``'s rows ``wanted``: remove the others, change the kept, add the new
    (inside the caller's transaction: its one version bump)."""
    keep = {t.url: t for t in wanted}
    for row in stored:
        target = keep.get(row.url)
        if target is None:
            row.delete()
        elif (row.weight, row.enabled) != (target.weight, target.enabled):
            row.weight, row.enabled = target.weight, target.enabled
            row.save()
    have = {row.url for row in stored}
    for t in wanted:
        if t.url not in have:
            Target(module=module, url=t.url, weight=t.weight, enabled=t.enabled).save()


__all__ = [
    "TARGET_KEYS",
    "check_targets",
    "export_targets",
    "stored_targets",
    "targets_differ",
    "write_targets",
]
