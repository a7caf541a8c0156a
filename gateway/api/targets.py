"""A module's targets: ``/vx11/modules/{module}/targets[/{id}]`` (SPEC §1, §18).

``GET`` lists the targets in effect (the ``Target`` rows, else the env list or the code URL,
whose ``id`` is ``null``); ``POST`` adds a row, ``PATCH`` changes one, ``DELETE`` removes one
(admin). A module's first row replaces its env/code URLs; removing its last row brings them
back. Every write is one version bump: live in every process within a second.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.api.permissions import ReadClientWriteAdmin
from gateway.api.serializers import TargetOutSerializer, unknown_fields
from gateway.config.modules import WEIGHT_DEFAULT, WEIGHT_MAX, WEIGHT_MIN, ModuleInfo
from gateway.config.validation import MODULE_NAME_RE
from gateway.core.problems import NotFound
from gateway.models import Target
from gateway.operations import targets


class TargetSerializer(serializers.Serializer[Any]):
    """The body of ``POST`` (``url`` required) and ``PATCH`` (any of them)."""

    url = serializers.CharField(max_length=255, help_text="http(s)://host[:port]")
    weight = serializers.IntegerField(
        min_value=WEIGHT_MIN, max_value=WEIGHT_MAX, default=WEIGHT_DEFAULT
    )
    enabled = serializers.BooleanField(default=True)

    def to_internal_value(self, data: Any) -> Any:
        unknown = unknown_fields(data, self.fields)
        if unknown:
            raise serializers.ValidationError(unknown)
        return super().to_internal_value(data)


class TargetListSerializer(serializers.Serializer[Any]):
    """``GET /vx11/modules/{module}/targets``."""

    module = serializers.CharField()
    lb = serializers.CharField(help_text="least_request | round_robin | session")
    source = serializers.CharField(  # type: ignore[assignment]
        help_text="Where the targets come from: code | env | database"
    )
    targets = TargetOutSerializer(many=True)
    count = serializers.IntegerField()


def _module(name: str) -> ModuleInfo:
    info = targets.module_info(name) if MODULE_NAME_RE.match(name) else None
    if info is None:
        raise NotFound(f"No module named {name[:40]!r}.", module=name[:40])
    return info


def _row(module: str, target: str) -> Target:
    ok = target.isascii() and target.isdigit() and len(target) < 19
    row = targets.get_target(module, int(target)) if ok else None
    if row is None:
        raise NotFound(f"Module {module!r} has no target {target[:20]!r}.", module=module)
    return row


def _save(module: str, data: Any, row: Target | None) -> Target:
    serializer = TargetSerializer(data=data, partial=row is not None)
    serializer.is_valid(raise_exception=True)
    try:
        return targets.save_target(module, dict(serializer.validated_data), row)
    except DjangoValidationError as exc:
        raise serializers.ValidationError(exc.message_dict) from exc


_EXAMPLE = {"url": "http://10.0.0.6:8002", "weight": 100, "enabled": True}


class TargetListView(APIView):
    permission_classes = [ReadClientWriteAdmin]

    @extend_schema(
        operation_id="vx11_module_targets_list",
        responses=TargetListSerializer,
        summary="A module's targets in effect",
    )
    def get(self, request: Request, module: str) -> Response:
        info = _module(module)
        found = targets.target_list(info)
        body = {"module": module, "lb": info.lb, "source": info.source, "targets": found}
        return Response({**body, "count": len(found)})

    @extend_schema(
        request=TargetSerializer,
        responses={201: TargetOutSerializer},
        summary="Add a target to a module (admin)",
        description="The module's first target row replaces its env/code URLs.",
        examples=[OpenApiExample("A second replica", value=_EXAMPLE, request_only=True)],
    )
    def post(self, request: Request, module: str) -> Response:
        _module(module)
        row = _save(module, request.data, None)
        return Response(targets.target_dict(module, row), status=status.HTTP_201_CREATED)


class TargetDetailView(APIView):
    permission_classes = [ReadClientWriteAdmin]

    @extend_schema(
        request=TargetSerializer,
        responses=TargetOutSerializer,
        summary="Change a target's URL, weight or enabled flag (admin)",
    )
    def patch(self, request: Request, module: str, target: str) -> Response:
        _module(module)
        row = _save(module, request.data, _row(module, target))
        return Response(targets.target_dict(module, row))

    @extend_schema(
        responses={204: None},
        summary="Remove a target (admin); without rows the module's env/code URLs return",
    )
    def delete(self, request: Request, module: str, target: str) -> Response:
        _module(module)
        targets.delete_target(_row(module, target))
        return Response(status=status.HTTP_204_NO_CONTENT)
