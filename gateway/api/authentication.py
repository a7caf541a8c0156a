"""DRF authentication with gateway tokens: the same rules as the proxy (401 vs 403)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from gateway.config.snapshot import ClientInfo, Snapshot
from gateway.core.conf import gw
from gateway.core.tokens import hash_token
from gateway.edge import auth
from gateway.models import ApiClient


@dataclass(frozen=True)
class TokenUser:
    """``request.user`` for token callers; ``request.auth`` holds the Principal."""

    principal: auth.Principal
    is_authenticated: bool = True
    is_anonymous: bool = False

    @property
    def is_staff(self) -> bool:
        return self.principal.is_admin

    @property
    def pk(self) -> str:
        return self.principal.id

    def __str__(self) -> str:
        return self.principal.name


def principal_for_token(token: str) -> auth.Principal | None:
    """Check a token against env tokens and the database (management path: no snapshot)."""
    operator = auth.authenticate(token, Snapshot(0, {}, {}, {}))
    if operator is not None:
        return operator
    client = ApiClient.objects.filter(token_hash=hash_token(token), active=True).first()
    if client is None:
        return None
    info = ClientInfo(
        client.id, client.name, client.is_admin, client.rate_limit, client.protected_rate_limit
    )
    return auth.authenticate(token, Snapshot(0, {}, {}, {client.token_hash: info}))


def staff_principal(user: Any) -> auth.Principal:
    """A logged-in staff user as a Principal (admin rights, keyed by the user's pk)."""
    return auth.Principal("staff", f"user:{user.pk}", str(user), True)


def principal_of(request: Request) -> auth.Principal | None:
    """The caller as a Principal: token callers, staff sessions, or None."""
    if isinstance(request.auth, auth.Principal):
        return request.auth
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False) and user.is_staff:
        return staff_principal(user)
    if not gw.auth_enabled:
        return auth.AUTH_DISABLED
    return None


class GatewayTokenAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        token = auth.client_token(
            request.headers.get("X-VX11-Token"), request.headers.get("Authorization")
        )
        if token is None:
            return None
        if not gw.auth_enabled:
            return TokenUser(auth.AUTH_DISABLED), auth.AUTH_DISABLED
        principal = principal_for_token(token)
        if principal is None:
            raise exceptions.PermissionDenied("The token is not valid.")
        return TokenUser(principal), principal

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="vx11"'
