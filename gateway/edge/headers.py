"""Header rules for proxied traffic: hop-by-hop, gateway credentials, X-Forwarded-*, Host.

The proxy path bypasses Django's middleware, so what ``SecurityMiddleware``,
``CommonMiddleware`` (``ALLOWED_HOSTS``) and the session machinery would do is done
here, in the passes the proxy already makes over the headers: :class:`RequestHead`
reads every request header the proxy needs in one pass, ``Call.upstream_headers``
and ``proxy.response_headers`` filter in one pass each.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.http.request import split_domain_port, validate_host

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
# Never forwarded upstream: gateway credentials, and headers the gateway sets itself.
# (``Cookie`` goes upstream without the gateway's own cookies: ``strip_gateway_cookies``.)
DROP_UPSTREAM = HOP_BY_HOP | frozenset(
    {
        b"host",
        b"x-vx11-token",
        b"x-vx11-gw-token",
        b"x-correlation-id",
        b"x-request-id",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-by",
        b"forwarded",
        b"traceparent",
        b"tracestate",
        b"expect",
    }
)
# Not passed back to the client from the upstream answer: hop-by-hop, and headers whose
# only valid values are the gateway's own (an upstream copy would be a second value).
DROP_DOWNSTREAM = HOP_BY_HOP | frozenset({b"server", b"date", b"x-correlation-id"})
#: Upstream answer headers starting with one of these are the gateway's (``X-VX11-*``,
#: ``RateLimit``/``RateLimit-Policy`` and any ``ratelimit*``, ``X-RateLimit-*``).
#: ``Retry-After`` is the module's and passes.
OWNED_PREFIXES = (b"x-vx11-", b"ratelimit", b"x-ratelimit-")


def listed_names(connection_values: list[bytes]) -> frozenset[bytes]:
    """Header names named by the values of the ``Connection`` header lines."""
    named: set[bytes] = set()
    for value in connection_values:
        named.update(part.strip().lower() for part in value.split(b",") if part.strip())
    return frozenset(named)


# --------------------------------------------------------------------------- one pass

_CID, _RID, _TOKEN, _AUTH, _GW, _XFF, _XFP, _HOST, _CONN, _LENGTH = range(10)
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
}


class RequestHead:
    """The request headers the proxy reads, found in one pass over the ASGI headers.

    Single-valued headers keep their first line (as a lookup would); ``X-Forwarded-For``,
    ``X-Forwarded-Proto`` and ``Connection`` keep every line (RFC 9110 §5.3: several
    lines are one comma-separated list); ``Host`` lines are counted.
    """

    __slots__ = (
        "authorization",
        "connection",
        "content_length",
        "correlation_id",
        "forwarded_for",
        "forwarded_proto",
        "gw_token",
        "host",
        "hosts",
        "request_id",
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
        wanted = _WANTED.get
        for name, value in headers:  # ASGI header names are lowercase
            which = wanted(name)
            if which is None:
                continue
            if which == _XFF:
                if self.forwarded_for is None:
                    self.forwarded_for = [value]
                else:
                    self.forwarded_for.append(value)
            elif which == _HOST:
                self.hosts += 1
                if self.host is None:
                    self.host = value.decode("latin-1")
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
            elif which == _TOKEN:
                if self.token is None:
                    self.token = value.decode("latin-1")
            elif which == _AUTH:
                if self.authorization is None:
                    self.authorization = value.decode("latin-1")
            elif which == _GW:
                if self.gw_token is None:
                    self.gw_token = value.decode("latin-1")
            elif self.content_length is None:  # _LENGTH
                self.content_length = value.decode("latin-1")

    def listed(self) -> frozenset[bytes]:
        """Header names the request's ``Connection`` header declares hop-by-hop."""
        return listed_names(self.connection) if self.connection else _NOTHING

    def forwarded_for_list(self) -> str | None:
        """Every ``X-Forwarded-For`` line as one list, in order."""
        lines = self.forwarded_for
        if lines is None:
            return None
        return (lines[0] if len(lines) == 1 else b", ".join(lines)).decode("latin-1")


_NOTHING: frozenset[bytes] = frozenset()


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


def strip_gateway_cookies(lines: list[bytes]) -> bytes | None:
    """The ``Cookie`` lines as one value without the gateway's session and CSRF cookies.

    ``None`` when nothing is left. Names are read as Django reads them
    (``django.http.cookie.parse_cookie``: the part before the first ``=``, stripped).
    """
    names = edge().cookie_names
    if len(lines) == 1 and not any(name in lines[0] for name in names):
        return lines[0]  # the common case: no gateway cookie, the line passes unchanged
    kept = []
    for line in lines:
        for piece in line.split(b";"):
            piece = piece.strip()
            if not piece:
                continue
            if b"=" in piece and piece.split(b"=", 1)[0].strip() in names:
                continue
            kept.append(piece)
    return b"; ".join(kept) if kept else None


def sets_gateway_cookie(value: bytes) -> bool:
    """Whether a ``Set-Cookie`` value would set the gateway's session or CSRF cookie.

    Also a nameless cookie whose value starts with one of those names
    (``=sessionid=…``): browsers store it (RFC 6265bis) and send it back as
    ``Cookie: sessionid=…``, which Django would read as the session cookie.
    """
    pair = value.split(b";", 1)[0]
    name, equals, rest = pair.partition(b"=")
    name = name.strip()
    if not name and equals:
        name = rest.partition(b"=")[0].strip()
    return name in edge().cookie_names


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
