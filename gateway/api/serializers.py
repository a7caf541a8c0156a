"""Serializers for the management API (validation messages people can act on)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from gateway.models import PRIORITY_CHOICES, Route
from gateway.modules import known_module_names
from gateway.routes import CODE_ROUTES, OVERRIDABLE
from gateway.validation import (
    METHODS,
    TIMEOUT_MAX,
    TIMEOUT_MIN,
    validate_endpoint,
    validate_intent,
)


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


class EffectiveRouteSerializer(serializers.Serializer[Any]):
    """One entry of the effective table (read-only)."""

    intent = serializers.CharField()
    module = serializers.CharField()
    endpoint = serializers.CharField()
    method = serializers.CharField()
    timeout = serializers.FloatField()
    description = serializers.CharField()
    auth_required = serializers.BooleanField()
    priority = serializers.CharField()
    protected = serializers.BooleanField()
    streaming = serializers.BooleanField()
    context7 = serializers.BooleanField()
    retry_post = serializers.BooleanField()
    enabled = serializers.BooleanField()
    source = serializers.ChoiceField(choices=["code", "database"])  # type: ignore[assignment]
