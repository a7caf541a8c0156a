"""Strict reading of a configuration document's text and values (SPEC §21).

Django's ``to_python`` is lenient on purpose (a form field gets text): ``true`` becomes 1 in
an integer column, ``3.9`` becomes 3, ``"7"`` becomes 7, and a list in a text column becomes
its ``str()``. A document that says ``failure_threshold: true`` is a mistake, so every value
is checked against its column's kind before the models' own validation runs, and the error
names the path. Floats must be finite (a NaN would never compare equal to itself, so the
same document would "change" the configuration on every import).

YAML: anchors and aliases are refused (a few hundred bytes of nested aliases expand into
gigabytes: the "billion laughs"), and so are duplicate keys (PyYAML keeps the last one
silently), as decK and yamllint do.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from django.db import models


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases and without duplicate keys."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error follows
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load(text: str | bytes) -> Any:
    """The YAML (or JSON) text as Python values, strictly."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def value_error(column: models.Field[Any, Any], value: Any) -> str | None:
    """Why ``value`` cannot go into ``column`` (``None``: it can; the column's own
    validators run afterwards). ``None`` values are the caller's (the column's default)."""
    if isinstance(column, models.BooleanField):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(column, models.IntegerField):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be a whole number"
        return "must not be negative" if value < 0 else None
    if isinstance(column, models.FloatField):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if not math.isfinite(value):
            return "must be a finite number"
        return "must not be negative" if value < 0 else None
    if isinstance(column, models.JSONField):
        return None if isinstance(value, list) else "must be a list"
    if isinstance(column, models.CharField):
        return None if isinstance(value, str) else "must be text"
    return None


__all__ = ["StrictLoader", "load", "value_error"]
