"""The one seam to the modules: ``send(module, request)``.

The caller chooses the target among the module's pool (:func:`choose_target`: the
balancer's choice for one attempt, SPEC §18) and passes its URL as ``origin``; without one
the module's URL is used (its first enabled target). The seam chooses the transport (``gateway.upstream.transports``: h1 for a
body in memory or none, aiohttp for a streamed one) and maps every failure to one
gateway problem (:func:`problem`, the one error ladder):

- a request that cannot be written as HTTP/1.1 (CR/LF/NUL in the target or a header
  value, a header name that is not a token) → 400, before anything is sent;
- no connection (refused, unreachable, DNS, TLS handshake) → the request's
  ``unavailable`` (503 by default);
- the deadline passed (connect, head) → 504;
- no valid answer (closed early, a status outside 100–599, broken framing) → 502.

The answer's body is read later by the caller; its failures are mapped by
``gateway.upstream.response.body_error``.
"""

from __future__ import annotations

from collections.abc import Collection

from gateway.config.modules import ModuleInfo
from gateway.core.problems import BadGateway, GatewayError, InvalidRequest, UpstreamTimeout
from gateway.policies.balancer import LEAST_REQUEST, Pool, TargetView
from gateway.upstream.h1_conn import ConnectFailed
from gateway.upstream.h1_head import InvalidRequestHead
from gateway.upstream.request import OutboundRequest, Transport
from gateway.upstream.response import UpstreamResponse
from gateway.upstream.transports import H1, STREAMING

#: What a transport raises when sending fails (everything else is a bug and propagates).
SENDING_ERRORS = (InvalidRequestHead, TimeoutError, ConnectFailed, ConnectionError)


def choose_target(
    pool: Pool,
    request: OutboundRequest,
    lb: str = LEAST_REQUEST,
    now: float = 0.0,
    *,
    key: str | None = None,
    exclude: Collection[str] = (),
) -> TargetView:
    """The target of one attempt of ``request`` among ``pool``'s (``Pool.choose``: ``lb``,
    ejections and health at ``now``, the session ``key``, the targets a retry avoids).

    A pool of one enabled target returns it at once. No enabled target: the request's
    ``unavailable`` problem (503)."""
    target = pool.choose(lb, now, key=key, exclude=exclude)
    if target is None:
        raise request.unavailable(f"The module {pool.module} has no enabled target.")
    return target


def choose_transport(request: OutboundRequest) -> Transport:
    """h1 for a body in memory (or none), the streaming client for an upload in progress."""
    body = request.body
    return H1 if body is None or isinstance(body, bytes) else STREAMING


def problem(exc: BaseException, request: OutboundRequest) -> GatewayError:
    """The error ladder: a transport's failure (one of :data:`SENDING_ERRORS`) as a problem."""
    if isinstance(exc, InvalidRequestHead):
        return InvalidRequest(f"The request cannot be forwarded: {exc}.")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"The module did not answer within {request.timeout:g} s.")
    if isinstance(exc, ConnectFailed):
        return request.unavailable(f"Cannot connect to the module: {exc}.")
    return BadGateway(f"The module sent no valid answer: {exc}.")


async def send(
    module: ModuleInfo,
    request: OutboundRequest,
    transport: Transport | None = None,
    *,
    origin: str | None = None,
) -> UpstreamResponse:
    """Send ``request`` to ``module``; returns once the answer's head is in.

    ``origin``: the chosen target's URL (default: the module's URL). ``transport``: instead
    of the one :func:`choose_transport` picks (health probes send through an
    ``H1Transport`` with a pool of their own). Raises gateway problems only (the ladder:
    :func:`problem`).
    """
    if transport is None:
        transport = choose_transport(request)
    try:
        return await transport.send(origin or module.url, request)
    except SENDING_ERRORS as exc:
        raise problem(exc, request) from exc


__all__ = ["SENDING_ERRORS", "choose_target", "choose_transport", "problem", "send"]
