"""Hop-by-hop rules for both directions of a proxied exchange, in one place.

- **Request side** (client → module), :func:`request_headers`: the client's headers minus
  hop-by-hop (RFC 9110 §7.6.1, plus every name its ``Connection`` lists), the gateway's
  credentials and the headers the gateway sets itself; ``Cookie`` without the gateway's
  own cookies; W3C trace context only when valid; then the gateway's ``X-Forwarded-*``.
- **Answer side** (module → client), :func:`answer_headers`: the module's headers minus
  hop-by-hop (and what its ``Connection`` lists), the headers only the gateway may set
  (``Server``, ``Date``, ``X-Correlation-ID``, ``X-VX11-*``, ``RateLimit*``) and any
  ``Set-Cookie`` that would set the gateway's session or CSRF cookie.

One pass per direction: one set test per header, a tuple of prefixes on the answer side;
the rare ``Connection``-listed names and cookies are the extra work. The names of the
gateway's cookies and the extra request-side names (Django's CSRF header) come from the
caller (``gateway.edge.headers.EdgeSettings``): these rules know no settings.
"""

from __future__ import annotations

from gateway.core import correlation

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
# (``Cookie`` goes upstream without the gateway's own cookies: ``strip_cookies``.)
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

NOTHING: frozenset[bytes] = frozenset()


def listed_names(connection_values: list[bytes]) -> frozenset[bytes]:
    """Header names named by the values of the ``Connection`` header lines."""
    named: set[bytes] = set()
    for value in connection_values:
        named.update(part.strip().lower() for part in value.split(b",") if part.strip())
    return frozenset(named)


def strip_cookies(lines: list[bytes], names: frozenset[bytes]) -> bytes | None:
    """The ``Cookie`` lines as one value without the cookies called one of ``names``.

    ``None`` when nothing is left. Names are read as Django reads them
    (``django.http.cookie.parse_cookie``: the part before the first ``=``, stripped).
    Several lines become one, as RFC 9113 §8.2.3 joins them for HTTP/1.1.
    """
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


def sets_cookie(value: bytes, names: frozenset[bytes]) -> bool:
    """Whether a ``Set-Cookie`` value would set a cookie called one of ``names``.

    Also a nameless cookie whose value starts with one of those names
    (``=sessionid=…``): browsers store it (RFC 6265bis) and send it back as
    ``Cookie: sessionid=…``, which Django would read as that cookie.
    """
    pair = value.split(b";", 1)[0]
    name, equals, rest = pair.partition(b"=")
    name = name.strip()
    if not name and equals:
        name = rest.partition(b"=")[0].strip()
    return name in names


def request_headers(
    raw: list[tuple[bytes, bytes]],
    drop: frozenset[bytes],
    listed: frozenset[bytes],
    cookie_names: frozenset[bytes],
    *,
    drop_authorization: bool,
    drop_length: bool,
    forwarded: list[tuple[str, str]],
) -> list[tuple[str, str]]:
    """What goes upstream of the client's headers ``raw`` (ASGI: lower-case names), in one pass.

    ``drop``: the names never forwarded (``DROP_UPSTREAM`` and the caller's own);
    ``listed``: the names the request's ``Connection`` declares hop-by-hop;
    ``drop_authorization``: ``Authorization`` carried a gateway credential;
    ``drop_length``: the body goes from memory, the gateway's HTTP client sets its ``Content-Length``;
    ``forwarded``: the gateway's own headers, appended last.
    """
    out: list[tuple[str, str]] = []
    traceparent = tracestate = None
    cookies: list[bytes] | None = None
    for name, value in raw:
        lname = name.lower()
        if lname in drop or lname in listed:
            if lname == b"traceparent":
                traceparent = value.decode("latin-1")
            elif lname == b"tracestate":
                tracestate = value.decode("latin-1")
            continue
        if lname == b"cookie":
            if cookies is None:
                cookies = [value]
            else:
                cookies.append(value)
            continue
        if (lname == b"authorization" and drop_authorization) or (
            lname == b"content-length" and drop_length
        ):
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    if cookies is not None:
        kept = strip_cookies(cookies, cookie_names)
        if kept is not None:
            out.append(("cookie", kept.decode("latin-1")))
    if correlation.valid_traceparent(traceparent):
        out.append(("traceparent", traceparent or ""))
        if correlation.valid_tracestate(tracestate):
            out.append(("tracestate", tracestate or ""))
    out += forwarded
    return out


def answer_headers(
    upstream: list[tuple[bytes, bytes]], cookie_names: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """What goes to the client of the module's answer headers (names lower-cased), one pass."""
    out: list[tuple[bytes, bytes]] = []
    connection: list[bytes] | None = None
    for k, v in upstream:
        lk = k.lower()
        if lk in DROP_DOWNSTREAM or lk.startswith(OWNED_PREFIXES):
            if lk == b"connection":
                connection = [v] if connection is None else [*connection, v]
            continue
        if lk == b"set-cookie" and sets_cookie(v, cookie_names):
            continue
        out.append((lk, v))
    if connection is not None:
        listed = listed_names(connection)
        out = [(k, v) for k, v in out if k not in listed]
    return out
