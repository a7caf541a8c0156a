"""Who is calling: token extraction and constant-time checks.

Two kinds of credentials: operator tokens from ``VX11_TOKEN`` (compared with
``hmac.compare_digest`` over SHA-256 digests, so neither content nor length
leaks through timing) and ``ApiClient`` tokens, looked up by their SHA-256 in
the in-process snapshot (a hash lookup reveals nothing usable about the token:
finding a token whose digest shares a prefix is a preimage search).
"""

from __future__ import annotations

import functools
import hmac
from dataclasses import dataclass

from gateway.config.snapshot import Snapshot
from gateway.core.conf import gw
from gateway.core.tokens import hash_token


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # operator | client | staff | anonymous
    id: str  # stable key for rate limits and session ownership
    name: str
    is_admin: bool
    rate_limit: int | None = None
    protected_rate_limit: int | None = None

    @property
    def authenticated(self) -> bool:
        return self.kind != "anonymous"


ANONYMOUS = Principal("anonymous", "anonymous", "anonymous", False)
AUTH_DISABLED = Principal("operator", "auth-disabled", "auth disabled", True)


@functools.lru_cache(maxsize=64)
def _digests(candidates: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The configured tokens' digests, computed once per configuration."""
    return tuple((candidate, hash_token(candidate)) for candidate in candidates)


def _match_any(token: str, candidates: list[str], digest: str | None = None) -> str | None:
    """Compare against every candidate (no early exit); return the matching one.

    ``digest``: ``hash_token(token)``, when the caller has it already."""
    if digest is None:
        digest = hash_token(token)
    found: str | None = None
    for candidate, candidate_digest in _digests(tuple(candidates)):
        if hmac.compare_digest(digest, candidate_digest):
            found = candidate
    return found


def bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def client_token(x_vx11_token: str | None, authorization: str | None) -> str | None:
    """The client credential: ``X-VX11-Token`` first, else ``Authorization: Bearer``."""
    if x_vx11_token:
        return x_vx11_token.strip()
    return bearer(authorization)


@functools.lru_cache(maxsize=64)
def _operator(token: str) -> Principal:
    """The principal of a configured operator token (named by a hash, never the token)."""
    return Principal("operator", "op:" + hash_token(token)[:16], "operator", True)


def authenticate(token: str, snapshot: Snapshot) -> Principal | None:
    """The principal for a token, or None when it is not valid."""
    digest = hash_token(token)
    operator = _match_any(token, list(gw.token), digest)
    if operator is not None:
        return _operator(operator)
    info = snapshot.clients.get(digest)
    if info is None:
        return None
    return Principal(
        "client",
        f"client:{info.id}",
        info.name,
        info.is_admin,
        info.rate_limit,
        info.protected_rate_limit,
    )


def check_gateway_token(token: str | None) -> bool | None:
    """``X-VX11-GW-Token`` for protected /shub paths: None missing, False wrong, True ok."""
    if not token:
        return None
    return _match_any(token.strip(), list(gw.gateway_token)) is not None
