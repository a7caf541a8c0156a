"""Modules for operators: ``/vx11/modules[/{module}]`` and ``/vx11/circuit-breaker/*``.

A thin DRF layer over :mod:`gateway.operations.breakers`, which the admin actions,
the dashboard and ``manage.py breaker`` call too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.api.authentication import principal_of
from gateway.api.permissions import IsClient, ReadClientWriteAdmin
from gateway.api.serializers import (
    BreakerDetailSerializer,
    BreakerPageSerializer,
    ModuleDetailSerializer,
    ModuleListSerializer,
)
from gateway.config.modules import ModuleInfo
from gateway.core.problems import InvalidRequest, NotFound
from gateway.operations.breakers import (
    breaker_statuses,
    force_breaker,
    module_overview,
)
from gateway.operations.configuration import module_table
from gateway.policies.breaker import FORCE_ACTIONS, BreakerStatus

log = logging.getLogger("gateway.breaker")

# --------------------------------------------------------------------------- views

_BREAKER_EXAMPLE = {
    "state": "open",
    "failure_count": 3,
    "last_failure": 1767225600.5,
    "opened_at": 1767225600.5,
    "retry_after": 42.1,
}


class ModuleListView(APIView):
    permission_classes = [IsClient]

    @extend_schema(
        operation_id="vx11_modules_list",
        responses=ModuleListSerializer,
        summary="Every module with its URL, health and breaker state",
    )
    def get(self, request: Request) -> Response:
        modules = module_overview()
        return Response({"modules": modules, "count": len(modules), "timestamp": time.time()})


class ModuleDetailView(APIView):
    permission_classes = [IsClient]

    @extend_schema(
        operation_id="vx11_module_retrieve",
        responses=ModuleDetailSerializer,
        summary="One module: URL, health, breaker state and bulkhead",
    )
    def get(self, request: Request, module: str) -> Response:
        _known(module)
        return Response({**module_overview([module])[0], "timestamp": time.time()})


class BreakerStatusView(APIView):
    permission_classes = [IsClient]

    @extend_schema(
        responses=BreakerPageSerializer,
        summary="Every module's circuit breaker",
        examples=[
            OpenApiExample(
                "One open breaker",
                value={
                    "status": "ok",
                    "breakers": {"switch": _BREAKER_EXAMPLE},
                    "timestamp": 1767225618.4,
                },
            )
        ],
    )
    def get(self, request: Request) -> Response:
        statuses = breaker_statuses()
        return Response(
            {
                "status": "ok",
                "breakers": {name: s.as_dict() for name, s in statuses.items()},
                "timestamp": time.time(),
            }
        )


def _known(module: str) -> dict[str, ModuleInfo]:
    table = module_table()
    if module not in table:
        raise NotFound(f"No module named {module[:40]!r}.", module=module[:40])
    return table


def _status_body(module: str, status: BreakerStatus, **extra: Any) -> dict[str, Any]:
    return {
        "status": "ok",
        "module": module,
        **extra,
        "breaker": status.as_dict(),
        "forced": status.forced,
        "timestamp": time.time(),
    }


class BreakerDetailView(APIView):
    permission_classes = [ReadClientWriteAdmin]

    @extend_schema(responses=BreakerDetailSerializer, summary="One module's circuit breaker")
    def get(self, request: Request, module: str) -> Response:
        table = _known(module)
        return Response(_status_body(module, breaker_statuses(table, [module])[module]))

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses=BreakerDetailSerializer,
        summary="Operator action on a breaker (admin)",
        description='Body `{"action": "reset" | "force_open" | "force_closed" | "auto"}`. '
        "reset: closed with counters cleared; force_open: refuse every call; force_closed: "
        "admit every call and never trip; auto: lift the override.",
        examples=[
            OpenApiExample("Open by hand", value={"action": "force_open"}, request_only=True)
        ],
    )
    def post(self, request: Request, module: str) -> Response:
        table = _known(module)
        data = request.data
        action = data.get("action") if isinstance(data, dict) else None
        if not isinstance(action, str) or action not in FORCE_ACTIONS:
            raise InvalidRequest(
                "The body must be a JSON object with action: one of "
                + ", ".join(sorted(FORCE_ACTIONS))
                + "."
            )
        status = force_breaker(module, action, table)
        principal = principal_of(request)
        log.info(
            "breaker action",
            extra={
                "gw_module": module,
                "action": action,
                "by": principal.name if principal else "?",
                "state": status.state,
            },
        )
        return Response(_status_body(module, status, action=action))
