"""Upstream: the one seam to the modules (HTTP/1.1 client, connection pools, TLS).

    from gateway.upstream import send, OutboundRequest
    response = await send(module, OutboundRequest(method, target, headers, body, timeout))

``send`` goes to ``origin`` (the target the caller chose with ``choose_target``; default the
module's URL), chooses the transport and raises gateway problems only
(``gateway.upstream.seam``); ``close()`` closes this loop's shared clients.
"""

from gateway.upstream.request import Body, OutboundRequest, Transport
from gateway.upstream.response import UpstreamResponse
from gateway.upstream.seam import choose_target, choose_transport, problem, send
from gateway.upstream.transports import H1Transport, StreamingTransport, close

__all__ = [
    "Body",
    "H1Transport",
    "OutboundRequest",
    "StreamingTransport",
    "Transport",
    "UpstreamResponse",
    "choose_target",
    "choose_transport",
    "close",
    "problem",
    "send",
]
