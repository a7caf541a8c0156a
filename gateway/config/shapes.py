"""One source per configuration shape: a module's settings and a route's fields.

The dataclasses here are the shapes; everything else derives from their ``fields()``:
``ModuleInfo`` and ``RouteConfig`` extend them, ``MODULE_FIELDS`` (``BREAKER_FIELDS`` and
the bulkhead's ``max_concurrent``) and ``ROUTE_FIELDS`` name the model columns that the
snapshot reads, the admin shows and the API accepts, and :func:`check_model` (run when
``gateway.models`` is imported) refuses a model whose columns drifted from the shape.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, fields
from typing import Any, get_origin, get_type_hints

from django.core.exceptions import ImproperlyConfigured
from django.db import models

from gateway.config.fallbacks import Fallback


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerSettings:
    """A module's own breaker settings (``None``: the ``VX11_CB_*`` default)."""

    failure_threshold: int | None = None
    recovery_timeout: float | None = None
    half_open_max_calls: int | None = None
    success_threshold: int | None = None
    failure_rate_threshold: float | None = None
    window_seconds: float | None = None
    min_calls: int | None = None

    def breaker_overrides(self) -> dict[str, Any]:
        """The settings this module sets (the others keep the defaults)."""
        return {
            name: value for name in BREAKER_FIELDS if (value := getattr(self, name)) is not None
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleSettings(BreakerSettings):
    """Every per-module setting: the breaker's, and the module's bulkhead (SPEC §10)."""

    #: Upstream calls in flight at once, per process (``None``: the env
    #: ``VX11_MODULE_<NAME>_MAX_CONCURRENT``; 0: no cap of its own, only the process cap).
    max_concurrent: int | None = None
    #: The choice of a target (SPEC §18): least_request | round_robin | session ("": the
    #: env ``VX11_MODULE_<NAME>_LB``, else least_request).
    lb: str = ""


@dataclass(frozen=True, slots=True)
class RouteFields:
    """The fields of a route that a database ``Route`` row may override."""

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
    idle_timeout: float = 60.0  # streaming: most silence between two chunks (SPEC §20)
    max_duration: float = 3600.0  # streaming: the whole stream (SPEC §20)
    fallbacks: tuple[Fallback, ...] = ()  # tried in order when the module cannot (SPEC §19)
    fallback_on: str = ""  # triggers, a comma list ("": all but 429; SPEC §19)


#: The breaker settings, in order (``Module`` columns, admin fieldset, snapshot).
BREAKER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BreakerSettings))
#: Every per-module setting, in order (``Module`` columns, the document's module keys).
MODULE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ModuleSettings))
#: The overridable route fields, in order (``Route`` columns, admin form, API body).
ROUTE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RouteFields))


def values_of(obj: object, names: tuple[str, ...]) -> dict[str, Any]:
    """``{name: obj.name}`` for the named fields (a model row read into a shape)."""
    return {name: getattr(obj, name) for name in names}


_COLUMNS: dict[type, type[models.Field[Any, Any]]] = {
    bool: models.BooleanField,
    int: models.IntegerField,
    float: models.FloatField,
    str: models.CharField,
    tuple: models.JSONField,  # a list of options (``NULL``: inherit)
}


def check_model(model: type[models.Model], shape: type) -> None:
    """Refuse a model whose columns do not match the shape's fields.

    Each field needs a column of its Python type that can be left empty (``NULL``, or
    blank text), since an empty column inherits the default.
    """
    hints = get_type_hints(shape)
    for f in fields(shape):
        hint = hints[f.name]
        kinds = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
        kind = kinds[0] if isinstance(hint, types.UnionType) else (get_origin(hint) or hint)
        column = model._meta.get_field(f.name)
        expected = _COLUMNS[kind]
        empty = isinstance(column, expected) and column.blank and (column.null or kind is str)
        if not empty:
            raise ImproperlyConfigured(
                f"{model.__name__}.{f.name} must be an optional {expected.__name__} "
                f"(it is {shape.__name__}.{f.name}: {hint})"
            )
