"""Management API for the route table: ``/vx11/routes`` and ``/vx11/routes/{intent}``."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.api.permissions import ReadClientWriteAdmin
from gateway.api.serializers import (
    EffectiveRouteSerializer,
    RouteSerializer,
    RouteTableSerializer,
)
from gateway.config.routes import CODE_ROUTES, OVERRIDABLE, build_routes
from gateway.config.validation import INTENT_RE
from gateway.core.problems import InvalidRequest, NotFound
from gateway.models import Route

#: What a ``PUT`` resets an omitted field to: empty, so it inherits the code route again.
_BLANK: dict[str, Any] = {
    **{name: None if Route._meta.get_field(name).null else "" for name in OVERRIDABLE},
    "enabled": Route._meta.get_field("enabled").default,
}


def effective_table() -> dict[str, Any]:
    return {
        intent: cfg.as_dict() for intent, cfg in build_routes(list(Route.objects.all())).items()
    }


def _no_route(intent: str) -> NotFound:
    return NotFound(f"No route for intent {intent[:40]!r}.")


def _nameable(intent: str) -> bool:
    """Whether a path parameter can name an intent at all.

    Checked before any query: a NUL (``%00``) in a text parameter is a ``DataError`` on
    PostgreSQL (SQLite accepts it), so an impossible name never reaches the database.
    """
    return INTENT_RE.match(intent) is not None


def effective_route(intent: str) -> dict[str, Any]:
    table = effective_table()
    if intent not in table:
        raise _no_route(intent)
    entry: dict[str, Any] = table[intent]
    return entry


class RouteListView(APIView):
    permission_classes = [ReadClientWriteAdmin]

    @extend_schema(
        operation_id="vx11_routes_list",
        responses=RouteTableSerializer,
        summary="The effective route table (code defaults overlaid by overrides)",
    )
    def get(self, request: Request) -> Response:
        routes = sorted(effective_table().values(), key=lambda r: r["intent"])
        return Response({"routes": routes, "count": len(routes)})

    @extend_schema(
        request=RouteSerializer,
        responses={201: EffectiveRouteSerializer},
        summary="Register an override or a new intent (admin)",
    )
    def post(self, request: Request) -> Response:
        serializer = RouteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            row = serializer.save()
        return Response(effective_route(row.intent), status=status.HTTP_201_CREATED)


class RouteDetailView(APIView):
    permission_classes = [ReadClientWriteAdmin]

    @extend_schema(responses=EffectiveRouteSerializer, summary="One effective route")
    def get(self, request: Request, intent: str) -> Response:
        return Response(effective_route(intent))

    def _save(self, request: Request, intent: str, *, partial: bool) -> Response:
        if not _nameable(intent):
            if partial:  # PATCH changes an existing route: none can have this name
                raise _no_route(intent)
            raise InvalidRequest(
                "Invalid fields: intent.",
                errors={
                    "intent": ["Lowercase letters, digits, '-' or '_', starting with a letter."]
                },
            )
        row = Route.objects.filter(intent=intent).first()
        if row is None and intent not in CODE_ROUTES and partial:
            raise _no_route(intent)
        if not isinstance(request.data, dict):
            raise InvalidRequest("The body must be a JSON object.")
        if request.data.get("intent", intent) != intent:
            raise InvalidRequest(
                "Invalid fields: intent.",
                errors={"intent": [f"The body names another intent than the path ({intent!r})."]},
            )
        data = {**request.data, "intent": intent}
        if not partial:  # PUT replaces: omitted fields go back to inheriting
            data = {**_BLANK, **data}
        serializer = RouteSerializer(row, data=data, partial=partial)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            serializer.save()
        created = row is None
        return Response(
            effective_route(intent),
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )

    @extend_schema(
        request=RouteSerializer,
        responses={200: EffectiveRouteSerializer, 201: EffectiveRouteSerializer},
        summary="Replace the override of an intent (admin)",
    )
    def put(self, request: Request, intent: str) -> Response:
        return self._save(request, intent, partial=False)

    @extend_schema(
        request=RouteSerializer,
        responses={200: EffectiveRouteSerializer, 201: EffectiveRouteSerializer},
        summary="Change fields of the override of an intent (admin)",
    )
    def patch(self, request: Request, intent: str) -> Response:
        return self._save(request, intent, partial=True)

    @extend_schema(
        responses={200: EffectiveRouteSerializer, 204: None},
        summary="Remove an override; a code intent falls back to its default (admin)",
    )
    def delete(self, request: Request, intent: str) -> Response:
        if not _nameable(intent):
            raise NotFound(f"No override for intent {intent[:40]!r}.")
        deleted, _ = Route.objects.filter(intent=intent).delete()
        if not deleted:
            raise NotFound(f"No override for intent {intent[:40]!r}.")
        if intent in CODE_ROUTES:
            return Response(effective_route(intent))
        return Response(status=status.HTTP_204_NO_CONTENT)
