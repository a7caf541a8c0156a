"""The rate-limit scopes a request is counted against: a small registry.

The shape of DRF's throttles (``rest_framework/throttling.py``): each scope has a name
(``scope``, what a 429 reports and ``/vx11/rate-limit/status`` lists) and a
:meth:`~TokenScope.get_cache_key` that names the bucket a caller's requests go to, or
``None`` when the scope does not apply; :meth:`~TokenScope.get_rate` is its limit per
``VX11_RATE_LIMIT_WINDOW``. :data:`SCOPES` lists them in the order they are checked;
:func:`build_scopes` turns them into the :class:`~gateway.policies.ratelimit.Scope` tuples
the limiter decides on (the proxy and the status endpoint both call it).

A new scope is one class here and one entry in :data:`SCOPES`.
"""

from __future__ import annotations

from typing import Protocol

from gateway.core.conf import gw
from gateway.policies.ratelimit import Scope


class Caller(Protocol):
    """Who is calling, as the scopes read it (``gateway.edge.auth.Principal``)."""

    @property
    def id(self) -> str: ...
    @property
    def authenticated(self) -> bool: ...
    @property
    def rate_limit(self) -> int | None: ...
    @property
    def protected_rate_limit(self) -> int | None: ...


class RateScope(Protocol):
    """One rate-limit scope (DRF's ``scope`` / ``get_cache_key`` / ``get_rate``)."""

    scope: str

    def get_cache_key(self, caller: Caller, client_ip: str, protected: bool) -> str | None: ...
    def get_rate(self, caller: Caller) -> int: ...


class TokenScope:
    """Every authenticated caller: its own limit (``ApiClient.rate_limit``) or the default."""

    scope = "token"

    def get_cache_key(self, caller: Caller, client_ip: str, protected: bool) -> str | None:
        return "token:" + caller.id if caller.authenticated else None

    def get_rate(self, caller: Caller) -> int:
        return caller.rate_limit or gw.rate_limit_token


class IpScope:
    """Every request, by client IP (``VX11_TRUSTED_PROXIES`` decides which one)."""

    scope = "ip"

    def get_cache_key(self, caller: Caller, client_ip: str, protected: bool) -> str | None:
        return "ip:" + client_ip

    def get_rate(self, caller: Caller) -> int:
        return gw.rate_limit_ip


class ProtectedScope:
    """Protected routes and /shub paths: by caller, anonymous callers by IP."""

    scope = "protected"

    def get_cache_key(self, caller: Caller, client_ip: str, protected: bool) -> str | None:
        if not protected:
            return None
        return "protected:" + (caller.id if caller.authenticated else "ip:" + client_ip)

    def get_rate(self, caller: Caller) -> int:
        return caller.protected_rate_limit or gw.rate_limit_protected


#: The scopes, in the order they are checked (and reported).
SCOPES: tuple[RateScope, ...] = (TokenScope(), IpScope(), ProtectedScope())


def build_scopes(caller: Caller, client_ip: str, protected: bool) -> list[Scope]:
    """The limits one request is counted against (also read by the status endpoint)."""
    window = gw.rate_limit_window
    scopes = []
    for rule in SCOPES:
        key = rule.get_cache_key(caller, client_ip, protected)
        if key is not None:
            scopes.append(Scope(rule.scope, key, rule.get_rate(caller), window))
    return scopes


__all__ = [
    "SCOPES",
    "Caller",
    "IpScope",
    "ProtectedScope",
    "RateScope",
    "TokenScope",
    "build_scopes",
]
