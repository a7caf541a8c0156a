"""Context-7 management API: list, read, delete sessions; clean up expired ones.

Callers see their own sessions; admins (admin clients, operator tokens, staff)
see every session. Someone else's session answers 403 ``forbidden`` — the same
answer the proxy gives when a request names it — and an unknown or expired id
404 ``not_found``.
"""

from __future__ import annotations

import re

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.api.authentication import principal_of
from gateway.core.problems import AuthRequired, InvalidRequest
from gateway.edge.auth import Principal
from sessions_ctx7 import reading, services
from sessions_ctx7.serializers import (
    CleanupSerializer,
    SessionDetailSerializer,
    SessionPageSerializer,
    SessionSerializer,
)

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
TRUE = {"1", "true", "yes", "on"}
OWNER_RE = re.compile(r"[!-~]{1,100}\Z")  # principal ids: client:7, user:1, operator:…


def _caller(request: Request) -> Principal:
    principal = principal_of(request)
    if principal is None:  # the permission class has already refused this
        raise AuthRequired()
    return principal


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer.") from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}.")
    return value


class SessionListView(APIView):
    @extend_schema(
        operation_id="context7_sessions_list",
        summary="Context-7 sessions of the caller (every session for admins)",
        parameters=[
            OpenApiParameter(
                "limit", OpenApiTypes.INT, description=f"1-{MAX_LIMIT}, default {DEFAULT_LIMIT}"
            ),
            OpenApiParameter("offset", OpenApiTypes.INT, description="Default 0"),
            OpenApiParameter(
                "include_expired",
                OpenApiTypes.BOOL,
                description="Also list expired sessions not purged yet",
            ),
            OpenApiParameter(
                "client", OpenApiTypes.STR, description="Admins: only this owner (e.g. client:7)"
            ),
        ],
        responses=SessionPageSerializer,
    )
    def get(self, request: Request) -> Response:
        caller = _caller(request)
        limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        owner: str | None = caller.id
        if caller.is_admin:
            owner = request.query_params.get("client") or None
            if owner is not None and not OWNER_RE.match(owner):
                # Checked before the query: a NUL is a DataError on PostgreSQL.
                raise InvalidRequest(
                    "client must be an owner id such as client:7 (printable ASCII, max 100).",
                    errors={"client": ["Not an owner id."]},
                )
        include_expired = request.query_params.get("include_expired", "").lower() in TRUE
        sessions = reading.visible(owner, include_expired=include_expired)
        page = sessions[offset : offset + limit]
        return Response(
            {
                "total": sessions.count(),
                "limit": limit,
                "offset": offset,
                "sessions": SessionSerializer(page, many=True).data,
            }
        )


class SessionDetailView(APIView):
    @extend_schema(
        operation_id="context7_session_read",
        summary="One session with its messages and context summary",
        responses=SessionDetailSerializer,
    )
    def get(self, request: Request, session_id: str) -> Response:
        caller = _caller(request)
        session = reading.get_for(caller.id, caller.is_admin, session_id)
        return Response(SessionDetailSerializer(session).data)

    @extend_schema(
        operation_id="context7_session_delete",
        summary="Delete a session and its messages",
        responses={204: None},
    )
    def delete(self, request: Request, session_id: str) -> Response:
        caller = _caller(request)
        session = reading.get_for(caller.id, caller.is_admin, session_id, include_expired=True)
        session.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


class CleanupView(APIView):
    @extend_schema(
        operation_id="context7_cleanup",
        summary="Delete expired sessions (the caller's own; every one for admins)",
        request=None,
        responses=CleanupSerializer,
    )
    def post(self, request: Request) -> Response:
        caller = _caller(request)
        deleted = services.clear_expired(owner=None if caller.is_admin else caller.id)
        return Response({"deleted": deleted})
