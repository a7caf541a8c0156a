"""Request headers for proxied traffic: the one pass, Django's settings, X-Forwarded-*, Host.

The proxy path bypasses Django's middleware, so what ``SecurityMiddleware``,
``CommonMiddleware`` (``ALLOWED_HOSTS``) and the session machinery would do is done
here, in the passes the proxy already makes over the headers: :class:`RequestHead`
reads every request header the proxy needs in one pass; the hop-by-hop rules of both
directions (``gateway.upstream.hop``) filter in one pass each, with the settings read
here (:class:`EdgeSettings`).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.http.request import split_domain_port, validate_host

from gateway.upstream.hop import DROP_UPSTREAM, NOTHING, listed_names

# --------------------------------------------------------------------------- one pass

_CID, _RID, _TOKEN, _AUTH, _GW, _XFF, _XFP, _HOST, _CONN, _LENGTH, _TE, _IDEM, _SESSION = range(13)
_WANTED: dict[bytes, int] = {
    b"x-correlation-id": _CID,
    b"x-request-id": _RID,
    b"x-vx11-token": _TOKEN,
    b"authorization": _AUTH,
    b"x-vx11-gw-token": _GW,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"host": _HOST,
    b"connection": _CONN,
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"idempotency-key": _IDEM,
    b"x-vx11-session": _SESSION,
}


class RequestHead:
    """The request headers the proxy reads, found in one pass over the ASGI headers.

    Single-valued headers keep their first line (as a lookup would); ``X-Forwarded-For``,
    ``X-Forwarded-Proto`` and ``Connection`` keep every line (RFC 9110 §5.3: several
    lines are one comma-separated list); ``Host`` lines are counted; of
    ``Transfer-Encoding`` only its presence counts (a body of unknown size follows).
    """

    __slots__ = (
        "authorization",
        "chunked",
        "connection",
        "content_length",
        "correlation_id",
        "forwarded_for",
        "forwarded_proto",
        "gw_token",
        "host",
        "hosts",
        "idempotency_key",
        "request_id",
        "session",
        "token",
    )

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.correlation_id: str | None = None
        self.request_id: str | None = None
        self.token: str | None = None
        self.authorization: str | None = None
        self.gw_token: str | None = None
        self.content_length: str | None = None
        self.host: str | None = None
        self.hosts = 0
        self.forwarded_for: list[bytes] | None = None
        self.forwarded_proto: list[bytes] | None = None
        self.connection: list[bytes] | None = None
        self.chunked = False
        self.idempotency_key: str | None = None
        self.session: str | None = None
        self._read(headers)

    def _read(self, headers: list[tuple[bytes, bytes]]) -> None:
        wanted = _WANTED.get
        for name, value in headers:  # ASGI header names are lowercase
            which = wanted(name)
            if which is None:
                continue
            if which == _HOST:
                self.hosts += 1
                if self.host is None:
                    self.host = value.decode("latin-1")
            elif which == _LENGTH:
                if self.content_length is None:
                    self.content_length = value.decode("latin-1")
            elif which == _TOKEN:
                if self.token is None:
                    self.token = value.decode("latin-1")
            elif which == _AUTH:
                if self.authorization is None:
                    self.authorization = value.decode("latin-1")
            elif which == _XFF:
                if self.forwarded_for is None:
                    self.forwarded_for = [value]
                else:
                    self.forwarded_for.append(value)
            elif which == _CONN:
                if self.connection is None:
                    self.connection = [value]
                else:
                    self.connection.append(value)
            elif which == _XFP:
                if self.forwarded_proto is None:
                    self.forwarded_proto = [value]
                else:
                    self.forwarded_proto.append(value)
            elif which == _CID:
                if self.correlation_id is None:
                    self.correlation_id = value.decode("latin-1")
            elif which == _RID:
                if self.request_id is None:
                    self.request_id = value.decode("latin-1")
            elif which == _GW:
                if self.gw_token is None:
                    self.gw_token = value.decode("latin-1")
            elif which == _TE:
                self.chunked = True
            elif which == _IDEM:
                if self.idempotency_key is None:
                    self.idempotency_key = value.decode("latin-1")
            elif self.session is None:  # _SESSION
                self.session = value.decode("latin-1")

    def listed(self) -> frozenset[bytes]:
        """Header names the request's ``Connection`` header declares hop-by-hop."""
        return listed_names(self.connection) if self.connection else NOTHING

    def forwarded_for_list(self) -> str | None:
        """Every ``X-Forwarded-For`` line as one list, in order."""
        lines = self.forwarded_for
        if lines is None:
            return None
        return (lines[0] if len(lines) == 1 else b", ".join(lines)).decode("latin-1")


# --------------------------------------------------------------------------- Django's settings


class EdgeSettings:
    """The Django settings the proxy path applies, read once (again when a test changes one)."""

    __slots__ = ("allowed_hosts", "cookie_names", "drop_upstream", "hosts_seen")

    def __init__(self) -> None:
        allowed = list(settings.ALLOWED_HOSTS)
        if settings.DEBUG and not allowed:  # as HttpRequest.get_host
            allowed = [".localhost", "127.0.0.1", "[::1]"]
        self.allowed_hosts = allowed
        self.cookie_names = frozenset(
            {
                str(settings.SESSION_COOKIE_NAME).encode("latin-1"),
                str(settings.CSRF_COOKIE_NAME).encode("latin-1"),
            }
        )
        #: What never goes upstream: ``DROP_UPSTREAM`` and Django's CSRF header
        #: (``X-CSRFToken``: Swagger UI's "try it out" sends it on every POST; unmasked,
        #: it is the CSRF cookie's secret).
        csrf_header = str(settings.CSRF_HEADER_NAME).removeprefix("HTTP_")
        self.drop_upstream = DROP_UPSTREAM | {csrf_header.lower().replace("_", "-").encode()}
        #: Host header value -> whether it is allowed (bounded: see ``host_allowed``).
        self.hosts_seen: dict[str, bool] = {}


_EDGE_SETTINGS = frozenset(
    {"ALLOWED_HOSTS", "DEBUG", "SESSION_COOKIE_NAME", "CSRF_COOKIE_NAME", "CSRF_HEADER_NAME"}
)
_HOSTS_REMEMBERED = 256
_edge: EdgeSettings | None = None


def edge() -> EdgeSettings:
    global _edge
    current = _edge
    if current is None:
        current = _edge = EdgeSettings()
    return current


def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    global _edge
    if setting in _EDGE_SETTINGS:
        _edge = None


setting_changed.connect(_settings_changed, dispatch_uid="gateway.edge.headers.edge")


def host_allowed(host: str) -> bool:
    """Django's ``get_host`` rule: ``split_domain_port`` then ``validate_host``."""
    seen = edge().hosts_seen
    known = seen.get(host)
    if known is not None:
        return known
    domain, _port = split_domain_port(host)
    allowed = bool(domain) and validate_host(domain, edge().allowed_hosts)
    if len(seen) >= _HOSTS_REMEMBERED:  # a client inventing names must not grow memory
        seen.clear()
    seen[host] = allowed
    return allowed


# --------------------------------------------------------------------------- X-Forwarded-*


@lru_cache(maxsize=8)
def _networks(spec: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in spec)


def _in(addr: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in networks)


@lru_cache(maxsize=1024)
def peer_trusted(peer: str, trusted: tuple[str, ...]) -> bool:
    """Whether the direct peer is one of ``VX11_TRUSTED_PROXIES`` (peers repeat: cached)."""
    return bool(trusted) and _in(peer, _networks(trusted))


def client_ip(peer: str, xff: str | None, trusted: list[str] | tuple[str, ...]) -> tuple[str, str]:
    """The client IP and the X-Forwarded-For value to send upstream.

    The client's X-Forwarded-For (every line of it, joined: ``RequestHead``) is
    believed only when the direct peer is a trusted proxy: then the peer is appended
    and the client is the right-most untrusted address. Otherwise the header is
    discarded and the peer alone is used and sent.
    """
    if not trusted or not xff:
        return peer, peer
    spec = tuple(trusted)
    if not peer_trusted(peer, spec):
        return peer, peer
    networks = _networks(spec)
    chain = [part.strip() for part in xff.split(",") if part.strip()]
    chain.append(peer)
    forwarded = ", ".join(chain)
    for addr in reversed(chain):
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            return peer, forwarded  # garbage in the chain: believe only the peer
        if not _in(addr, networks):
            return addr, forwarded
    return chain[0], forwarded


def forwarded_proto(
    socket_scheme: str, lines: list[bytes] | None, peer: str, trusted: tuple[str, ...]
) -> str:
    """``X-Forwarded-Proto`` to send upstream: the socket's scheme, or the trusted peer's word.

    A client's value is believed only from a trusted direct peer, and only ``http`` or
    ``https``. Of a list (a proxy that appends) the right-most element is the one the
    trusted peer wrote.
    """
    if lines is None or not trusted or not peer_trusted(peer, trusted):
        return socket_scheme
    value = lines[-1].rsplit(b",", 1)[-1].strip().lower()
    if value == b"https":
        return "https"
    if value == b"http":
        return "http"
    return socket_scheme


def ip_allowed(addr: str, allowed: list[str]) -> bool:
    return not allowed or _in(addr, _networks(tuple(allowed)))
