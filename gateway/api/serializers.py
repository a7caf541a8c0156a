"""Serializers for the management API (validation messages people can act on)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_type_hints

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from gateway.config import fallbacks
from gateway.config.routes import CODE_ROUTES, OVERRIDABLE, ROUTE_KEYS, RouteConfig
from gateway.config.validation import (
    IDLE_TIMEOUT_MAX,
    IDLE_TIMEOUT_MIN,
    MAX_DURATION_MAX,
    MAX_DURATION_MIN,
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
    idle_timeout = serializers.FloatField(
        required=False, allow_null=True, min_value=IDLE_TIMEOUT_MIN, max_value=IDLE_TIMEOUT_MAX
    )
    max_duration = serializers.FloatField(
        required=False, allow_null=True, min_value=MAX_DURATION_MIN, max_value=MAX_DURATION_MAX
    )
    priority = serializers.ChoiceField(
        choices=[c[0] for c in PRIORITY_CHOICES], required=False, allow_blank=True
    )
    fallbacks = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text="Tried in order when the module cannot answer (SPEC §19), at most 3: "
        '[{"module": "madre", "endpoint": "/madre/chat", "method": "POST"}]; '
        "null inherits the code route's, [] turns fallbacks off.",
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

    def validate_fallback_on(self, value: str) -> str:
        problem = fallbacks.fallback_on_error(value)
        if problem is not None:
            raise serializers.ValidationError(problem)
        return fallbacks.normalise_fallback_on(value)

    def _check_fallbacks(self, intent: str, attrs: dict[str, Any]) -> None:
        """SPEC §19: known modules, none the route's own, at most 3 (the stored list is
        checked too when only ``module`` changes)."""
        chain = attrs.get("fallbacks", getattr(self.instance, "fallbacks", None))
        if not chain:
            return
        base = CODE_ROUTES.get(intent)
        module = attrs.get("module", getattr(self.instance, "module", ""))
        primary = module or (base.module if base else "")
        errors = fallbacks.fallback_errors(chain, primary, known_module_names())
        if errors:
            raise serializers.ValidationError({"fallbacks": errors})
        if "fallbacks" in attrs:
            attrs["fallbacks"] = fallbacks.normalise(chain)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        intent = attrs.get("intent") or (self.instance.intent if self.instance else "")
        self._check_fallbacks(intent, attrs)
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


class FallbackSerializer(serializers.Serializer[Any]):
    """One option of a route's fallback chain (SPEC §19)."""

    module = serializers.CharField()
    endpoint = serializers.CharField()
    method = serializers.CharField(required=False, help_text="Empty: the route's method")


def _effective_field(name: str) -> serializers.Field[Any, Any, Any, Any]:
    if name == "source":
        return serializers.ChoiceField(choices=["code", "database"])
    if name == "fallbacks":
        return FallbackSerializer(many=True)
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
    status = serializers.CharField(help_text="up | degraded (some targets down) | down | unknown")
    latency_ms = serializers.FloatField(allow_null=True)
    last_check = serializers.FloatField(allow_null=True, help_text="Unix time")
    consecutive_failures = serializers.IntegerField()
    last_error = serializers.CharField(allow_blank=True)


class TargetOutSerializer(serializers.Serializer[Any]):
    """One target of a module in effect (SPEC §18)."""

    id = serializers.IntegerField(allow_null=True, help_text="The Target row's id; null: env/code")
    url = serializers.CharField()
    weight = serializers.IntegerField()
    enabled = serializers.BooleanField()
    key = serializers.CharField(help_text="host:port: the metric label and X-VX11-Target")
    # What the gateway knows of it now (gateway.operations.targets.target_runtime).
    health = ModuleHealthSerializer(help_text="The health worker's last probe of this target")
    down = serializers.BooleanField(help_text="Its last probe failed: not chosen until one passes")
    ejected_until = serializers.FloatField(
        allow_null=True, help_text="Unix time its outlier ejection ends (null: not ejected)"
    )
    ejections = serializers.IntegerField(help_text="Times ejected lately (decays while healthy)")
    in_flight = serializers.IntegerField(help_text="Attempts to it in flight, this process")


class ModuleSerializer(serializers.Serializer[Any]):
    name = serializers.CharField()
    url = serializers.CharField(help_text="The first enabled target's URL")
    lb = serializers.CharField(help_text="least_request | round_robin | session")
    targets = TargetOutSerializer(many=True)
    enabled = serializers.BooleanField()
    source = serializers.CharField(help_text="code | env | database")  # type: ignore[assignment]
    health_path = serializers.CharField()
    health = ModuleHealthSerializer()
    breaker = BreakerSerializer()
    max_concurrent = serializers.IntegerField(
        help_text="The module's own cap on upstream calls in flight per process (0: none)"
    )
    inflight = serializers.IntegerField(
        allow_null=True, help_text="Calls holding its cap now, this process (null: no cap)"
    )
    queued = serializers.IntegerField(
        allow_null=True, help_text="Calls waiting at its cap now, this process (null: no cap)"
    )


class ModuleDetailSerializer(ModuleSerializer):
    """``GET /vx11/modules/{module}``."""

    timestamp = serializers.FloatField()


class ModuleListSerializer(serializers.Serializer[Any]):
    """``GET /vx11/modules``."""

    modules = ModuleSerializer(many=True)
    count = serializers.IntegerField()
    timestamp = serializers.FloatField()
