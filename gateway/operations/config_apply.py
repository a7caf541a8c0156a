"""Apply a configuration document (SPEC §21): the change list, then one transaction.

:func:`import_document` validates the whole document first (``config_doc.validate``), lists
the changes (added / changed / removed) and, unless it is a dry run, writes them in one
transaction that takes the configuration-version lock first. Every configuration write
announces itself (``gateway.config.versioning.announce_change``) once per transaction, so the
import is one version bump and every process switches to the new tables at once. A document
equal to the stored configuration writes nothing: no bump.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db import models, transaction
from django.utils import timezone

from gateway.config.versioning import ConfigVersion
from gateway.models import ApiClient, Module
from gateway.operations import config_targets
from gateway.operations.config_doc import (
    KEY_COLUMN,
    MODELS,
    SECTIONS,
    Planned,
    parse,
    row_values,
    validate,
)

#: A section's singular, for the change list.
NOUN = {"modules": "module", "routes": "route", "clients": "client"}


@dataclass(frozen=True, slots=True)
class Change:
    action: str  # added | changed | removed
    section: str
    name: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        detail = f" ({', '.join(self.fields)})" if self.fields else ""
        return f"{self.action} {NOUN[self.section]} {self.name}{detail}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "section": self.section,
            "name": self.name,
            "fields": list(self.fields),
        }


@dataclass
class Outcome:
    changes: list[Change]
    applied: bool
    version: int
    #: Tokens of the clients this import created: shown once, never stored.
    tokens: dict[str, str] = field(default_factory=dict)


def diff(planned: Planned, *, prune: bool) -> list[Change]:
    """What applying the planned rows changes, section by section, names sorted."""
    changes: list[Change] = []
    for section in SECTIONS:
        if section not in planned.rows:
            continue
        wanted, stored = planned.rows[section], planned.existing[section]
        for name in sorted(wanted):
            before = stored.get(name)
            if before is None:
                changes.append(Change("added", section, name))
                continue
            old, new = row_values(section, before), row_values(section, wanted[name])
            moved = tuple(key for key in old if old[key] != new[key])
            if section == "modules" and _targets_move(planned, name):
                moved += ("targets",)
            if moved:
                changes.append(Change("changed", section, name, moved))
        if prune:
            changes.extend(
                Change("removed", section, name) for name in sorted(set(stored) - set(wanted))
            )
    return changes


def _targets_move(planned: Planned, name: str) -> bool:
    """Whether the module entry's ``targets`` list changes its rows."""
    wanted = planned.targets.get(name)
    stored = planned.stored_targets.get(name, [])
    return wanted is not None and config_targets.targets_differ(wanted, stored)


def _write(planned: Planned, changes: list[Change]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for change in changes:
        if change.action == "removed":
            model: type[models.Model] = MODELS[change.section]
            key = KEY_COLUMN[change.section]
            model._default_manager.filter(**{key: change.name}).delete()
            continue
        row = planned.rows[change.section][change.name]
        if isinstance(row, ApiClient):
            if change.action == "added":
                tokens[change.name] = row.set_new_token()
            if "active" in change.fields or change.action == "added":
                row.revoked_at = None if row.active else timezone.now()
        row.save()
        if isinstance(row, Module) and change.name in planned.targets:
            stored = planned.stored_targets.get(change.name, [])
            config_targets.write_targets(row, planned.targets[change.name], stored)
    return tokens


def apply(planned: Planned, *, prune: bool = False, dry_run: bool = False) -> Outcome:
    """Diff, and unless ``dry_run`` write every change in one transaction (one version bump)."""
    changes = diff(planned, prune=prune)
    if dry_run or not changes:
        return Outcome(changes, False, ConfigVersion.read())
    with transaction.atomic():
        ConfigVersion.lock()
        tokens = _write(planned, changes)
    return Outcome(changes, True, ConfigVersion.read(), tokens)


def import_document(doc: dict[str, Any], *, prune: bool = False, dry_run: bool = False) -> Outcome:
    """Validate all of ``doc`` (``DocumentError`` with every error), then :func:`apply` it."""
    with transaction.atomic():
        ConfigVersion.lock()  # no other configuration write between the check and the write
        planned = validate(doc, prune=prune)
        return apply(planned, prune=prune, dry_run=dry_run)


def import_text(text: str | bytes, *, prune: bool = False, dry_run: bool = False) -> Outcome:
    """:func:`import_document` of YAML or JSON text."""
    return import_document(parse(text), prune=prune, dry_run=dry_run)
