"""Header rules for proxied traffic: hop-by-hop, gateway credentials, X-Forwarded-*."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

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
# Not passed back to the client from the upstream answer.
DROP_DOWNSTREAM = HOP_BY_HOP | frozenset({b"server", b"date"})


def connection_listed(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names a ``Connection`` header declares hop-by-hop."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(part.strip().lower() for part in value.split(b",") if part.strip())
    return frozenset(named)


@lru_cache(maxsize=8)
def _networks(spec: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in spec)


def _in(addr: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_ip(peer: str, xff: str | None, trusted: list[str]) -> tuple[str, str]:
    """The client IP and the X-Forwarded-For value to send upstream.

    The client's X-Forwarded-For is believed only when the direct peer is a
    trusted proxy: then the peer is appended and the client is the right-most
    untrusted address. Otherwise the header is discarded and the peer alone is
    used and sent.
    """
    if not trusted or not xff:
        return peer, peer
    networks = _networks(tuple(trusted))
    if not _in(peer, networks):
        return peer, peer
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


def ip_allowed(addr: str, allowed: list[str]) -> bool:
    return not allowed or _in(addr, _networks(tuple(allowed)))
