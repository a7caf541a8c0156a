"""The proxy path with CORS or the access log on: the client's side observed.

With both off (the default) ``gateway.edge.proxy`` uses the plain
:class:`~gateway.edge.answer.Downstream`, and this module costs the request one falsy check.
With either on, :func:`observe` gives it an :class:`Observed` downstream instead:

- CORS configured (``gateway.core.cors``): every answer's head is rewritten by the one
  policy (the upstream's ``Access-Control-*`` dropped, ``Vary: Origin``, the gateway's CORS
  headers for an allowed origin) — success, problem, 429, cached and streamed answers
  alike, since they all go through the downstream; a preflight from an allowed origin is
  answered here (:func:`answer_preflight`), before routing, authentication or the module;
- the access log on: the bytes of the request body received (``receive`` is wrapped)
  and of the answer's body sent are counted for ``gateway.edge.accesslog``.
"""

from __future__ import annotations

from gateway.core import cors
from gateway.core.asgi import Message, Receive, Send
from gateway.core.conf import gw
from gateway.edge.answer import Downstream
from gateway.edge.request import Request


class Observed(Downstream):
    """A downstream that applies the CORS policy to every head and counts body bytes."""

    __slots__ = ("bytes_in", "bytes_out", "origin", "policy", "preflight")

    def __init__(self, send: Send, policy: cors.Policy | None, origin: str | None) -> None:
        super().__init__(send)
        self.policy = policy
        self.origin = origin
        self.preflight = False
        self.bytes_in = 0
        self.bytes_out = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if self.policy is not None:
                message["headers"] = self.policy.apply(message.get("headers", ()), self.origin)
        else:
            self.bytes_out += len(message.get("body", b""))
        await Downstream.__call__(self, message)

    def counted(self, receive: Receive) -> Receive:
        """``receive``, counting the request body's bytes as they arrive."""

        async def counting() -> Message:
            message = await receive()
            self.bytes_in += len(message.get("body", b""))
            return message

        return counting


def observe(request: Request, send: Send, receive: Receive) -> tuple[Observed, Receive]:
    """The observed downstream (and ``receive``, counted when the access log is on)."""
    origins = gw.cors_allowed_origins
    policy = cors.policy(origins, gw.cors_allow_credentials) if origins else None
    origin: str | None = None
    request_method: str | None = None
    if policy is not None:
        for name, value in request.headers:  # one pass, only with CORS configured
            if name == b"origin":
                if origin is None:
                    origin = value.decode("latin-1")
            elif name == b"access-control-request-method" and request_method is None:
                request_method = value.decode("latin-1")
    downstream = Observed(send, policy, origin)
    if policy is not None:
        downstream.preflight = policy.is_preflight(request.method, origin, request_method)
    return downstream, downstream.counted(receive) if gw.access_log else receive


async def answer_preflight(downstream: Downstream, request: Request) -> None:
    """The gateway's own 204 to a preflight from an allowed origin: no token, no module."""
    assert isinstance(downstream, Observed)
    assert downstream.policy is not None and downstream.origin is not None
    headers = [
        (name.lower().encode(), value.encode("latin-1"))
        for name, value in downstream.policy.preflight_headers(downstream.origin)
    ]
    headers.append((b"x-correlation-id", request.cid.encode()))
    # The plain downstream's call: these headers are the policy's already.
    await Downstream.__call__(
        downstream, {"type": "http.response.start", "status": 204, "headers": headers}
    )
    await Downstream.__call__(downstream, {"type": "http.response.body", "body": b""})


__all__ = ["Observed", "answer_preflight", "observe"]
