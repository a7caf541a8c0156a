"""One proxied request, read from its ASGI scope once.

The first stage of the flow (``gateway.edge.proxy`` builds it, ``gateway.edge.router`` turns
it into a :class:`~gateway.edge.call.Call`): the headers in one pass
(:class:`~gateway.edge.headers.RequestHead`), what the scope says (method, path, query,
peer, scheme), the correlation id, and — in the order in which their refusals are
answered — the Host (:meth:`Request.check_host`), then the client IP, the forwarded
scheme and the declared length (:meth:`Request.admit`). Nothing later reads the scope.
"""

from __future__ import annotations

from gateway.core import correlation
from gateway.core.asgi import Scope
from gateway.core.conf import gw
from gateway.core.problems import InvalidRequest, PayloadTooLarge
from gateway.edge.headers import RequestHead, client_ip, forwarded_proto, host_allowed


class Request(RequestHead):
    """The request: its head read once, its scope's fields, and what follows from them."""

    __slots__ = (
        "cid",
        "client_ip",
        "forwarded_chain",
        "forwarded_host",
        "forwarded_scheme",
        "headers",
        "length",
        "method",
        "path",
        "peer",
        "query",
        "raw_path",
        "scheme",
        "server",
    )

    def __init__(self, scope: Scope, cid: str | None = None) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        RequestHead.__init__(self, headers)
        self.headers = headers
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.raw_path: bytes | None = scope.get("raw_path")
        self.query: bytes = scope.get("query_string", b"")
        self.scheme = str(scope.get("scheme", "http"))
        self.server: tuple[str, int | None] | None = scope.get("server")
        self.peer: str = (scope.get("client") or ("127.0.0.1", 0))[0]
        self.cid = (
            cid if cid is not None else correlation.pick(self.correlation_id, self.request_id)
        )
        self.forwarded_host = ""  # the validated Host (check_host)
        self.client_ip = ""  # as the rate limits and the access log name the client (admit)
        self.forwarded_chain = ""  # the X-Forwarded-For value sent upstream (admit)
        self.forwarded_scheme = "http"  # the X-Forwarded-Proto value sent upstream (admit)
        self.length: int | None = None  # the declared Content-Length, parsed once (admit)

    def check_host(self) -> str:
        """The Host, checked against ``ALLOWED_HOSTS`` as Django's ``get_host`` checks it."""
        if self.hosts > 1:
            raise InvalidRequest("The request has more than one Host header.")
        host = self.host
        if host is None:  # HTTP/1.0 without Host: the server's address, as Django uses it
            server = self.server or ("", None)
            host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
        if not host_allowed(host):
            raise InvalidRequest("The Host header names a host this gateway does not serve.")
        self.forwarded_host = host
        return host

    def admit(self) -> None:
        """The client IP, the forwarded scheme and the declared length (refused when over
        ``VX11_MAX_BODY_BYTES``), once the request is known to be routable."""
        trusted = tuple(gw.trusted_proxies)
        self.client_ip, self.forwarded_chain = client_ip(
            self.peer, self.forwarded_for_list(), trusted
        )
        length = self.length = parse_length(self.content_length)
        if length is not None and length > gw.max_body_bytes:
            raise PayloadTooLarge(f"The request body exceeds {gw.max_body_bytes} bytes.")
        self.forwarded_scheme = forwarded_proto(
            self.scheme, self.forwarded_proto, self.peer, trusted
        )


def parse_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidRequest("Content-Length is not a number.") from None
    if length < 0:
        raise InvalidRequest("Content-Length is negative.")
    return length
