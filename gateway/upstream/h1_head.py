"""Heads for ``gateway.upstream.h1``: the request head written upstream, and the answer's framing.

Both directions are checked the way the careful proxies do, at the cost of a few C-level
scans per request rather than a Python loop per character:

- **request** (RFC 9112 §3, RFC 9110 §5.5): the method and every header name are tokens,
  the target has no whitespace or control character, no header value carries CR, LF or
  NUL. A request that fails is refused with :class:`InvalidRequestHead` before one byte
  is written (nginx answers such a request 400 itself; httpcore/h11 raise
  ``LocalProtocolError`` before sending). Names are checked once and remembered.
- **answer** (RFC 9112 §6, nginx's ``ngx_http_proxy_process_header``, h11): one
  ``Content-Length`` (llhttp already refuses a second one, and both it and
  ``Transfer-Encoding``), at most one ``Transfer-Encoding`` and only exactly ``chunked``
  — ``gzip, chunked``, ``chunked, gzip``, ``identity`` are refused, as nginx ("upstream
  sent unknown Transfer-Encoding") and h11 do, instead of llhttp's read-until-close; a
  head of at most :data:`MAX_HEAD_BYTES` bytes and :data:`MAX_FIELDS` fields (nginx's
  ``proxy_buffer_size`` bounds its upstream head the same way).
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: The answer's head (interim 1xx heads included) may not exceed this many bytes ...
MAX_HEAD_BYTES = 64 * 1024
#: ... nor this many header fields.
MAX_FIELDS = 100


class InvalidRequestHead(ValueError):
    """The request cannot be written as HTTP/1.1 (CR/LF/NUL, a non-token name, ...)."""


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int
    base_path: str
    host_header: bytes


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
#: Header names already checked: the name → "is it Content-Length" (computed here).
_names: dict[str, bool] = {}
_NAMES_KEPT = 1024
_methods: set[str] = set()
_BODYLESS_OK = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def _learn_name(name: str) -> bool:
    if _TOKEN.fullmatch(name) is None:
        raise InvalidRequestHead(f"the header name {name!r} is not a token")
    sized = name.lower() == "content-length"
    if len(_names) < _NAMES_KEPT:
        _names[name] = sized
    return sized


def request_head(
    method: str, key: Origin, target: str, headers: list[tuple[str, str]], body: bytes | None
) -> bytes:
    """The request's head (``Content-Length`` computed here, never the caller's), checked.

    Raises :class:`InvalidRequestHead` when the method, target or a header cannot be
    written as they are without changing the message's framing.
    """
    if method not in _methods:
        if _TOKEN.fullmatch(method) is None:
            raise InvalidRequestHead(f"the method {method!r} is not a token")
        if len(_methods) < 64:
            _methods.add(method)
    if _BAD_TARGET.search(target) is not None:
        raise InvalidRequestHead("the target contains whitespace or a control character")
    names = _names
    lines: list[str] = []
    for name, value in headers:
        sized = names.get(name)
        if sized is None:
            sized = _learn_name(name)
        if not sized:
            lines.append(f"{name}: {value}\r\n")
    block = "".join(lines)
    count = len(lines)
    # Names are tokens, so any CR or LF beyond one pair per line is inside a value.
    if block.count("\n") != count or block.count("\r") != count or "\0" in block:
        raise InvalidRequestHead("a header value contains CR, LF or NUL")
    if body is not None:
        tail = b"Content-Length: %d\r\n\r\n" % len(body)
    elif method not in _BODYLESS_OK:
        tail = b"Content-Length: 0\r\n\r\n"
    else:
        tail = b"\r\n"
    try:
        return b"".join(
            (
                f"{method} {key.base_path}{target} HTTP/1.1\r\nHost: ".encode("latin-1"),
                key.host_header,
                b"\r\n",
                block.encode("latin-1"),
                tail,
            )
        )
    except UnicodeEncodeError as exc:
        raise InvalidRequestHead("the request head is not Latin-1") from exc


#: :func:`framing` for a chunked answer ...
CHUNKED = -1
#: ... and for one without Content-Length or Transfer-Encoding (sized by its end).
UNSIZED = -2


#: Only header names of these lengths can frame a body (checked per field, in C).
FRAMING_NAME_SIZES = frozenset({len(b"content-length"), len(b"transfer-encoding")})


def framing(current: int, name: bytes, value: bytes) -> int | str:
    """The body's framing once the field ``name: value`` is seen (``current``: before it):
    a ``Content-Length``, :data:`CHUNKED`, :data:`UNSIZED`, or why it is refused (a
    reason string). Called for the rare field whose name has a framing name's length."""
    lname = name.lower()
    if lname == b"content-length":
        if current == CHUNKED:
            return "both Content-Length and Transfer-Encoding"
        return int(value)  # llhttp has checked the digits and refused a second line
    if lname == b"transfer-encoding":
        if current == CHUNKED:
            return "two Transfer-Encoding lines"
        if current != UNSIZED:
            return "both Content-Length and Transfer-Encoding"
        if value.strip(b" \t").lower() != b"chunked":
            return f"Transfer-Encoding {value.decode('latin-1')!r} is not chunked"
        return CHUNKED
    return current


def head_size(headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes a head's fields take (``name: value\\r\\n``), for the rare large head."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


__all__ = [
    "CHUNKED",
    "FRAMING_NAME_SIZES",
    "MAX_FIELDS",
    "MAX_HEAD_BYTES",
    "UNSIZED",
    "InvalidRequestHead",
    "Origin",
    "framing",
    "head_size",
    "request_head",
]
