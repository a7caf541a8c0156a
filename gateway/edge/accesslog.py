"""The access log (SPEC §22): one JSON object per line, one line per proxied request.

``VX11_ACCESS_LOG=true`` → ``gateway.edge.proxy.record`` calls :func:`write` once the
request is over. The line goes to the ``gateway.access`` logger, whose handler
(``LOGGING`` in ``vx11site/settings.py``) writes the message alone to stdout: the message
*is* the JSON object (``orjson``), so every line parses on its own and carries exactly the
fields below, whatever ``VX11_LOG_LEVEL`` says.

Fields (nginx, Envoy and Kong log the same things): ``time`` (UTC, when the request
arrived), ``correlation_id``, ``principal`` (the caller's id — a hash-derived name for an
operator token, ``client:<id>`` for an API client — never a token), ``client_ip``,
``method``, ``intent`` (``null`` on /shub and before a route was found), ``path`` (at most
200 characters, no query), ``module``, ``target`` (host:port the request went to),
``status`` (499: the client left first), ``attempts``, ``fallback`` (``null`` until
fallbacks exist), ``upstream_ms`` (the last attempt, to the answer's head), ``total_ms``,
``bytes_in`` (request body received), ``bytes_out`` (answer body sent).
"""

from __future__ import annotations

import functools
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway.edge.call import Call
from gateway.edge.request import Request

log = logging.getLogger("gateway.access")
PATH_LIMIT = 200


@functools.lru_cache(maxsize=256)
def target_of(url: str) -> str:
    """``host:port`` of a module URL (the port its scheme implies when it names none)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def entry(
    request: Request,
    call: Call | None,
    status: int,
    seconds: float,
    bytes_in: int | None,
    bytes_out: int | None,
) -> dict[str, Any]:
    """The access-log object of one request."""
    now = time.time()
    route = call.route if call is not None else None
    upstream = call.upstream_seconds if call is not None else None
    return {
        "time": datetime.fromtimestamp(now - seconds, UTC).isoformat(timespec="milliseconds"),
        "correlation_id": request.cid,
        "principal": call.principal.id if call is not None else None,
        "client_ip": request.client_ip or request.peer,
        "method": request.method,
        "intent": route.intent if route is not None else None,
        "path": request.path[:PATH_LIMIT],
        "module": call.module.name if call is not None else None,
        "target": target_of(call.module.url) if call is not None and call.attempts else None,
        "status": status,
        "attempts": call.attempts if call is not None else 0,
        "fallback": None,
        "upstream_ms": round(upstream * 1000, 3) if upstream is not None else None,
        "total_ms": round(seconds * 1000, 3),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    }


def write(
    request: Request,
    call: Call | None,
    status: int,
    seconds: float,
    bytes_in: int | None,
    bytes_out: int | None,
) -> None:
    """Write the request's line (``gateway.access``, level INFO)."""
    if log.isEnabledFor(logging.INFO):
        line = orjson.dumps(entry(request, call, status, seconds, bytes_in, bytes_out))
        log.info(line.decode())


__all__ = ["PATH_LIMIT", "entry", "target_of", "write"]
