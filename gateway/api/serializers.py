"""Serializers for the management API (validation messages people can act on)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_type_hints

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from gateway.config.routes import CODE_ROUTES, OVERRIDABLE, ROUTE_KEYS, RouteConfig
from gateway.config.validation import (
    METHODS,
    TIMEOUT_MAX,
    TIMEOUT_MIN,
    validate_endpoint,
    validate_intent,
)
from gateway.models import PRIORITY_CHOICES, Route, known_module_names

#: Read-only members of an effective route (``GET``) that a body may carry back unchanged,
#: so ``GET`` then ``PUT`` of the same object works; they are ignored.
READ_ONLY_ECHO = frozenset({"source"})


def unknown_fields(data: Any, known: Any) -> dict[str, list[str]]:
    """``{name: ["Unknown field."]}`` for every member of ``data`` that is not in ``known``."""
    if not isinstance(data, Mapping):
        return {}
    return {
        str(name): ["Unknown field."]
        for name in sorted(map(str, data))
        if name not in known and name not in READ_ONLY_ECHO
    }


def _django(validator: Any, value: Any) -> Any:
    try:
        return validator(value)
    except DjangoValidationError as exc:
        raise serializers.ValidationError(exc.messages) from exc


class RouteSerializer(serializers.ModelSerializer[Route]):
    """An override row. Omitted fields inherit the code route (for code intents)."""

    intent = serializers.CharField(max_length=40)
    module = serializers.CharField(max_length=40, required=False, allow_blank=True)
    endpoint = serializers.CharField(max_length=255, required=False, allow_blank=True)
    method = serializers.CharField(max_length=8, required=False, allow_blank=True)
    timeout = serializers.FloatField(
        required=False, allow_null=True, min_value=TIMEOUT_MIN, max_value=TIMEOUT_MAX
    )
    priority = serializers.ChoiceField(
        choices=[c[0] for c in PRIORITY_CHOICES], required=False, allow_blank=True
    )

    class Meta:
        model = Route
        fields = ["intent", *OVERRIDABLE, "enabled"]

    def to_internal_value(self, data: Any) -> Any:
        """Unknown members are refused (SPEC §4), not silently dropped: a typo such as
        ``timeoutt`` would otherwise save an override that changes nothing."""
        unknown = unknown_fields(data, self.fields)
        if unknown:
            raise serializers.ValidationError(unknown)
        return super().to_internal_value(data)

    def validate_intent(self, value: str) -> str:
        value = _django(validate_intent, value)
        if self.instance is None and Route.objects.filter(intent=value).exists():
            raise serializers.ValidationError(
                f"An override for {value!r} exists; change it with PUT or PATCH."
            )
        return value

    def validate_module(self, value: str) -> str:
        if value and value not in known_module_names():
            known = ", ".join(sorted(known_module_names()))
            raise serializers.ValidationError(f"Unknown module {value!r}. Known: {known}.")
        return value

    def validate_endpoint(self, value: str) -> str:
        return _django(validate_endpoint, value) if value else value

    def validate_method(self, value: str) -> str:
        if not value:
            return value
        if value.upper() not in METHODS:
            raise serializers.ValidationError(f"Method must be one of {', '.join(METHODS)}.")
        return value.upper()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        intent = attrs.get("intent") or (self.instance.intent if self.instance else "")
        if intent not in CODE_ROUTES:
            module = attrs.get("module", getattr(self.instance, "module", ""))
            endpoint = attrs.get("endpoint", getattr(self.instance, "endpoint", ""))
            missing = {
                name: "A new intent needs this field."
                for name, value in (("module", module), ("endpoint", endpoint))
                if not value
            }
            if missing:
                raise serializers.ValidationError(missing)
        return attrs


#: The serializer field of each type a ``RouteConfig`` field has.
_FIELD_OF_TYPE: dict[object, type[serializers.Field[Any, Any, Any, Any]]] = {
    str: serializers.CharField,
    float: serializers.FloatField,
    bool: serializers.BooleanField,
}
_ROUTE_TYPES = get_type_hints(RouteConfig)


def _effective_field(name: str) -> serializers.Field[Any, Any, Any, Any]:
    if name == "source":
        return serializers.ChoiceField(choices=["code", "database"])
    return _FIELD_OF_TYPE[_ROUTE_TYPES[name]]()


class EffectiveRouteSerializer(serializers.Serializer[Any]):
    """One entry of the effective table (read-only)."""

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        """``RouteConfig``'s fields (``ROUTE_KEYS``), built from the dataclass."""
        return {name: _effective_field(name) for name in ROUTE_KEYS}


class RouteTableSerializer(serializers.Serializer[Any]):
    """``GET /vx11/routes``: the effective table, sorted by intent."""

    routes = EffectiveRouteSerializer(many=True)
    count = serializers.IntegerField()


# --------------------------------------------------------------------------- breakers, modules
# Response shapes of gateway/api/breakers.py (documentation only: the views build dicts).


class BreakerSerializer(serializers.Serializer[Any]):
    """A breaker's status (SPEC §6)."""

    state = serializers.ChoiceField(choices=["closed", "open", "half_open"])
    failure_count = serializers.IntegerField()
    last_failure = serializers.FloatField(allow_null=True, help_text="Unix time")
    opened_at = serializers.FloatField(allow_null=True, help_text="Unix time")
    retry_after = serializers.FloatField(help_text="Seconds until a probe is let through")


class BreakerPageSerializer(serializers.Serializer[Any]):
    """``GET /vx11/circuit-breaker/status``."""

    status = serializers.CharField()
    breakers = serializers.DictField(child=BreakerSerializer())
    timestamp = serializers.FloatField()


class BreakerDetailSerializer(serializers.Serializer[Any]):
    """``GET|POST /vx11/circuit-breaker/{module}``."""

    status = serializers.CharField()
    module = serializers.CharField()
    action = serializers.CharField(required=False, help_text="POST: the action applied")
    breaker = BreakerSerializer()
    forced = serializers.CharField(allow_null=True)
    timestamp = serializers.FloatField()


class ModuleHealthSerializer(serializers.Serializer[Any]):
    status = serializers.CharField(help_text="up | down | unknown")
    latency_ms = serializers.FloatField(allow_null=True)
    last_check = serializers.FloatField(allow_null=True, help_text="Unix time")
    consecutive_failures = serializers.IntegerField()
    last_error = serializers.CharField(allow_blank=True)


class ModuleSerializer(serializers.Serializer[Any]):
    name = serializers.CharField()
    url = serializers.CharField()
    enabled = serializers.BooleanField()
    source = serializers.CharField(help_text="code | env | database")  # type: ignore[assignment]
    health_path = serializers.CharField()
    health = ModuleHealthSerializer()
    breaker = BreakerSerializer()


class ModuleListSerializer(serializers.Serializer[Any]):
    """``GET /vx11/modules``."""

    modules = ModuleSerializer(many=True)
    count = serializers.IntegerField()
    timestamp = serializers.FloatField()
