"""Who may call the management API."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from gateway.api.authentication import principal_of


class IsClient(BasePermission):
    """Any valid token (client or operator) or a staff session."""

    def has_permission(self, request: Request, view: Any) -> bool:
        return principal_of(request) is not None


class IsAdminClient(BasePermission):
    """Admin client tokens, operator tokens, or staff sessions."""

    message = "This endpoint needs an admin token or a staff session."

    def has_permission(self, request: Request, view: Any) -> bool:
        principal = principal_of(request)
        return principal is not None and principal.is_admin


class ReadClientWriteAdmin(BasePermission):
    """Reads for any client; changes for admins."""

    message = "Changes need an admin token or a staff session."

    def has_permission(self, request: Request, view: Any) -> bool:
        principal = principal_of(request)
        if principal is None:
            return False
        return request.method in SAFE_METHODS or principal.is_admin
