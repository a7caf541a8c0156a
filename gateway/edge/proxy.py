"""The lean ASGI handler for proxied traffic: ``/vx11/route/{intent}`` and ``/shub/{path}``.

Mounted ahead of Django in ``vx11site.asgi`` because Django's ASGI handler
costs ≈1.7 ms CPU per request here (a thread per request for
``response.close``, see docs/PERFORMANCE.md). The flow runs one way:

    ProxyApp (this ASGI adapter) → Request (gateway.edge.request: the scope read once)
        → Call (gateway.edge.router: route, module, caller) → gateway.edge.pipeline
        → gateway.upstream.send (the seam) → gateway.edge.answer (the response writer)

Every error becomes a problem+json answer here, through ``gateway.core.problems``; the
request's metrics and access log are recorded here once it is over.
"""

from __future__ import annotations

import logging
import time

from gateway.core import correlation, metrics
from gateway.core.asgi import Receive, Scope, Send, send_bytes
from gateway.core.conf import gw
from gateway.core.problems import GatewayError, InternalError
from gateway.edge import accesslog, pipeline, router
from gateway.edge.answer import Downstream
from gateway.edge.body import ClientGone
from gateway.edge.call import SHUB_PREFIX, Call
from gateway.edge.headers import RequestHead
from gateway.edge.observed import Observed, answer_preflight, observe
from gateway.edge.request import Request
from gateway.operations import traffic

log = logging.getLogger("gateway.proxy")

#: The status counted (metrics, access log) for a client that left before its answer was
#: complete, as nginx logs it: never a module failure, never an answer anyone received.
CLIENT_CLOSED = 499


class ProxyApp:
    """ASGI application for the proxy paths (mounted by ``vx11site.asgi``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        token = correlation.current.set(request.cid)
        started = time.monotonic()
        downstream = Downstream(send)
        preflight = False
        if gw.cors_allowed_origins or gw.access_log:  # both off: this check is all they cost
            downstream, receive = observe(request, send, receive)
            preflight = downstream.preflight
        call: Call | None = None
        try:
            if preflight:  # CORS, from an allowed origin: answered here, never forwarded
                await answer_preflight(downstream, request)
                return
            call = await router.build(request)
            await pipeline.handle(call, receive, downstream)
        except GatewayError as raised:
            if call is not None and call.client_gone:
                log.info("client disconnected before sending its whole request")
                downstream.status = CLIENT_CLOSED
                return
            exc = raised
            if call is not None and call.body_error is not None:
                exc = call.body_error
            if not downstream.status:
                await send_problem(downstream, exc, request.cid, call)
            else:
                log.warning("upstream failed mid-answer", extra={"error": exc.code})
        except ClientGone:
            log.info("client disconnected before sending its whole request")
            downstream.status = CLIENT_CLOSED
        except OSError:
            # The client went away while we were writing to it; the upstream
            # response was closed by the pipeline's finally blocks.
            log.info("client disconnected during the answer")
            downstream.status = CLIENT_CLOSED
        except Exception:
            log.exception("unexpected error in the proxy")
            if not downstream.status:
                await send_problem(downstream, InternalError(), request.cid, call)
        finally:
            record(request, call, downstream.status, time.monotonic() - started, downstream)
            correlation.current.reset(token)

    async def build_call(self, scope: Scope, cid: str, head: RequestHead | None = None) -> Call:
        """The call for an ASGI scope, as ``__call__`` builds it (tests and tools).

        ``head``: accepted for callers that already read the headers; the request reads
        them again (the proxy itself builds a :class:`Request` once).
        """
        request = head if isinstance(head, Request) else Request(scope, cid)
        return await router.build(request)


async def send_problem(send: Send, exc: GatewayError, cid: str, call: Call | None) -> None:
    status, headers, body = exc.render(cid)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    raw.append((b"x-correlation-id", cid.encode()))
    if call is not None:
        if call.attempts:
            raw.append((b"x-vx11-attempts", str(call.attempts).encode()))
        if call.chosen is not None:  # an attempt was made: the last target tried
            raw.append((b"x-vx11-target", call.chosen.key.encode()))
        raw.extend(call.response_headers)
    await send_bytes(send, status, raw, body)


def record(
    request: Request,
    call: Call | None,
    status: int,
    seconds: float,
    downstream: Downstream | None = None,
) -> None:
    """Metrics and the optional access log (``gateway.edge.accesslog``) for one proxied
    request; without the access log, a request slower than 1 s is still logged here."""
    path = request.path
    if path.startswith(SHUB_PREFIX):
        metrics.shub_request(path, request.method, status, seconds)
    else:
        intent = call.route.intent if call is not None and call.route is not None else "unknown"
        module = call.module.name if call is not None else "none"
        metrics.request(intent, module, status, call.upstream_seconds if call is not None else None)
    traffic.record(call.module.name if call is not None else None, status, seconds)
    if gw.access_log:
        counted = downstream if isinstance(downstream, Observed) else None
        accesslog.write(
            request,
            call,
            status,
            seconds,
            counted.bytes_in if counted is not None else request.length,
            counted.bytes_out if counted is not None else None,
        )
    elif seconds > 1.0:
        log.info(
            "proxied request",
            extra={
                "method": request.method,
                "path": path[:200],
                "status": status,
                "seconds": round(seconds, 4),
                "attempts": call.attempts if call else 0,
                "client_ip": call.request.client_ip if call else None,
                "principal": call.principal.name if call else None,
            },
        )


__all__ = ["CLIENT_CLOSED", "ProxyApp", "record"]
