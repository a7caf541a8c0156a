"""CORS (SPEC §22): the one set of rules, for the proxy paths and the Django side alike.

Pure functions over the request's ``Origin``, method and ``Access-Control-Request-Method``:
what a preflight is answered with, and what an actual answer carries. The allowed origins
are parsed once, when the knobs are read (``VX11_CORS_ALLOWED_ORIGINS`` through
:func:`parse_origins`); :func:`policy` builds the :class:`Policy` once per configuration.

Decisions, as django-cors-headers and Kong's ``cors`` plugin make them:

- origins match exactly (a browser sends the serialised origin: lower-case scheme and host,
  no default port); no wildcard;
- the allowed methods and request headers are fixed lists (the browser compares the
  preflight's requested ones against them; nothing requested is echoed back);
- with CORS configured the gateway owns CORS on every answer: an upstream's own
  ``Access-Control-*`` headers are dropped (Kong's plugin overrides them), and every answer
  carries ``Vary: Origin`` (it differs by origin), whether or not the request had one;
- an ``OPTIONS`` that is not a preflight from an allowed origin is served as any request.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from vx11site.env import EnvError

ALLOW_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
#: Request headers a browser client may send (what the gateway reads, and Content-Type).
ALLOW_HEADERS = (
    "accept",
    "authorization",
    "content-type",
    "idempotency-key",
    "traceparent",
    "tracestate",
    "x-correlation-id",
    "x-request-id",
    "x-requested-with",
    "x-vx11-gw-token",
    "x-vx11-session",
    "x-vx11-token",
)
#: Answer headers a browser client may read (CORS-safelisted ones need no mention).
EXPOSE_HEADERS = (
    "Cache-Status",
    "RateLimit",
    "RateLimit-Policy",
    "Retry-After",
    "X-Cache",
    "X-Correlation-ID",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-VX11-Attempts",
    "X-VX11-Fallback",
    "X-VX11-Intent",
    "X-VX11-Module",
    "X-VX11-Session",
    "X-VX11-Target",
)
#: Seconds a browser may keep a preflight's answer (django-cors-headers' default).
MAX_AGE = 86400

PREFIX = "access-control-"
_PREFIX_BYTES = PREFIX.encode()
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_origins(items: list[str]) -> frozenset[str]:
    """The allowed origins, validated and serialised as a browser sends them.

    Each item is ``scheme://host[:port]`` (http or https, no path, query, user or
    wildcard); a trailing ``/`` and a default port are dropped, scheme and host are
    lower-cased. Anything else is refused, naming the item.
    """
    found: set[str] = set()
    for item in items:
        raw = item.strip().removesuffix("/")
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or parts.scheme.lower() not in _DEFAULT_PORTS
            or not parts.hostname
            or "*" in raw
            or parts.path
            or parts.query
            or parts.fragment
            or parts.username is not None
            or raw.endswith(":")
        ):
            raise EnvError(
                f"VX11_CORS_ALLOWED_ORIGINS: {item!r} is not an origin "
                "(scheme://host[:port], http or https, no path, no wildcard)"
            )
        scheme = parts.scheme.lower()
        host = parts.hostname.lower()
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal, as the browser serialises it
        found.add(
            f"{scheme}://{host}"
            if port is None or port == _DEFAULT_PORTS[scheme]
            else f"{scheme}://{host}:{port}"
        )
    return frozenset(found)


def is_cors_header(name: str | bytes) -> bool:
    """An ``Access-Control-*`` header (the gateway's alone when CORS is configured)."""
    if isinstance(name, bytes):
        return name.lower().startswith(_PREFIX_BYTES)
    return name.lower().startswith(PREFIX)


def vary_with_origin(existing: str | None) -> str:
    """A ``Vary`` value that names ``Origin`` (Django's ``patch_vary_headers`` rule)."""
    if not existing or not existing.strip():
        return "Origin"
    names = [part.strip() for part in existing.split(",") if part.strip()]
    if "*" in names or any(name.lower() == "origin" for name in names):
        return ", ".join(names)
    return ", ".join([*names, "Origin"])


@dataclass(frozen=True, slots=True)
class Policy:
    """The CORS rules of one configuration."""

    origins: frozenset[str]
    credentials: bool

    def allows(self, origin: str | None) -> bool:
        return origin is not None and origin in self.origins

    def is_preflight(self, method: str, origin: str | None, request_method: str | None) -> bool:
        """An ``OPTIONS`` with ``Access-Control-Request-Method`` from an allowed origin:
        the gateway answers it itself (204, no token, never forwarded)."""
        return method == "OPTIONS" and bool(request_method) and self.allows(origin)

    def preflight_headers(self, origin: str) -> list[tuple[str, str]]:
        """The headers of a preflight's 204 answer (``origin`` allowed)."""
        headers = [("Access-Control-Allow-Origin", origin)]
        if self.credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        headers += [
            ("Access-Control-Allow-Methods", ", ".join(ALLOW_METHODS)),
            ("Access-Control-Allow-Headers", ", ".join(ALLOW_HEADERS)),
            ("Access-Control-Max-Age", str(MAX_AGE)),
            ("Vary", "Origin"),
        ]
        return headers

    def answer_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """The CORS headers an actual answer carries (none for another origin; ``Vary``
        is merged by the caller with :func:`vary_with_origin`)."""
        if not self.allows(origin):
            return []
        assert origin is not None
        headers = [("Access-Control-Allow-Origin", origin)]
        if self.credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        headers.append(("Access-Control-Expose-Headers", ", ".join(EXPOSE_HEADERS)))
        return headers

    def apply(
        self, headers: Iterable[tuple[bytes, bytes]], origin: str | None
    ) -> list[tuple[bytes, bytes]]:
        """ASGI answer headers as the client gets them: the upstream's ``Access-Control-*``
        dropped, ``Origin`` added to ``Vary``, the gateway's CORS headers appended."""
        out: list[tuple[bytes, bytes]] = []
        vary: list[str] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered.startswith(_PREFIX_BYTES):
                continue
            if lowered == b"vary":
                vary.append(value.decode("latin-1"))
                continue
            out.append((name, value))
        out.append((b"vary", vary_with_origin(", ".join(vary) or None).encode("latin-1")))
        out += [(k.lower().encode(), v.encode("latin-1")) for k, v in self.answer_headers(origin)]
        return out


@functools.lru_cache(maxsize=8)
def policy(origins: frozenset[str], credentials: bool) -> Policy:
    """The policy of a configuration (``gw.cors_allowed_origins``, ``gw.cors_allow_credentials``)."""
    return Policy(origins, credentials)


__all__ = [
    "ALLOW_HEADERS",
    "ALLOW_METHODS",
    "EXPOSE_HEADERS",
    "MAX_AGE",
    "Policy",
    "is_cors_header",
    "parse_origins",
    "policy",
    "vary_with_origin",
]
