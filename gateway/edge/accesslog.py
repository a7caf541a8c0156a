"""The access log (SPEC §22): one JSON object per line, one line per proxied request.

``VX11_ACCESS_LOG=true`` → ``gateway.edge.proxy.record`` calls :func:`write` once the
request is over. The line (``orjson``) goes to standard output through a buffer
(``gateway.edge.logsink``: whole lines, written every 100 ms or 64 KiB, at most 4 KiB per
write so that worker processes sharing a pipe never mix their lines — not through
``logging``, which cost a quarter of the request), so every line parses on its own and
carries exactly the fields below, whatever ``VX11_LOG_LEVEL`` says.

Fields (nginx, Envoy and Kong log the same things): ``time`` (UTC, when the request
arrived), ``correlation_id``, ``principal`` (the caller's id — a hash-derived name for an
operator token, ``client:<id>`` for an API client — never a token), ``client_ip``,
``method``, ``intent`` (``null`` on /shub and before a route was found), ``path`` (at most
200 characters, no query), ``module``, ``target`` (host:port of the target that answered: the last attempt's),
``status`` (499: the client left first), ``attempts``, ``fallback`` (the hops of a
fallback chain that answered, as in ``X-VX11-Fallback``; else ``null``), ``upstream_ms`` (the last attempt, to the answer's head), ``total_ms``,
``bytes_in`` (request body received), ``bytes_out`` (answer body sent).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.edge import logsink
from gateway.edge.call import Call
from gateway.edge.request import Request

PATH_LIMIT = 200


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
        "target": call.chosen.key if call is not None and call.chosen is not None else None,
        "status": status,
        "attempts": call.attempts if call is not None else 0,
        "fallback": call.fallback if call is not None else None,
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
    """Queue the request's line for standard output (``gateway.edge.logsink``)."""
    logsink.stdout.add(orjson.dumps(entry(request, call, status, seconds, bytes_in, bytes_out)))


__all__ = ["PATH_LIMIT", "entry", "write"]
