"""What goes upstream: the request as the seam takes it, and the transport interface."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from gateway.core.problems import GatewayError, UpstreamUnavailable
from gateway.upstream.response import UpstreamResponse

#: A request body: in memory, streamed (an upload still arriving), or none.
Body = bytes | AsyncIterator[bytes] | None


@dataclass(slots=True)
class OutboundRequest:
    """One request for a module: ``target`` is the path and query, sent byte for byte
    after the module URL's base path; ``timeout`` bounds the whole exchange (the answer's
    body included) — or, with ``head_only`` (streaming routes, SPEC §20), only the wait
    for the answer's head, the body then bounded by its reader; a connect failure is
    raised as ``unavailable`` (503 by default)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: Body
    timeout: float
    unavailable: type[GatewayError] = UpstreamUnavailable
    head_only: bool = False


class Transport(Protocol):
    """Sends one request to ``origin`` (``scheme://host[:port][/base]``) and returns once the
    answer's head is in (its body is read later by the caller).

    Failures are raised as the transport-neutral exceptions the seam maps to problems
    (``gateway.upstream.seam.problem``): ``InvalidRequestHead`` (nothing was sent),
    ``TimeoutError``, ``ConnectFailed``, ``ConnectionError`` (no valid answer).
    """

    async def send(self, origin: str, request: OutboundRequest) -> UpstreamResponse: ...


__all__ = ["Body", "OutboundRequest", "Transport"]
