"""One proxied call as the pipeline sees it: the request, where it goes, how it went.

Built by ``gateway.edge.router`` from a :class:`~gateway.edge.request.Request`; read and
updated by the pipeline steps (``gateway.edge.pipeline``, ``gateway.edge.exchange``), the
body reader (``gateway.edge.body``) and the answer writer (``gateway.edge.answer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config.modules import ModuleInfo
from gateway.config.routes import RouteConfig
from gateway.config.snapshot import Snapshot
from gateway.core.conf import SHUB_HEALTH_PATHS, gw
from gateway.core.problems import GatewayError, ShubUnavailable, UpstreamUnavailable
from gateway.edge.auth import Principal
from gateway.edge.headers import edge
from gateway.edge.request import Request
from gateway.policies.balancer import TargetView
from gateway.upstream import hop

SHUB_PREFIX = "/shub"
#: The /shub paths whose GET and HEAD have priority "health" (and whose GET is cached).
HEALTH_PATHS = SHUB_HEALTH_PATHS


@dataclass(slots=True)
class Call:
    """One proxied request: what the router decided, and the exchange's state."""

    request: Request
    kind: str  # intent | shub
    method: str  # the method sent upstream
    upstream_path: str
    principal: Principal
    module: ModuleInfo
    route: RouteConfig | None
    priority: str
    protected: bool
    snapshot: Snapshot
    deadline: float  # time.monotonic() by which the route's answer is due
    drop_authorization: bool  # ``Authorization`` carried the gateway's credential
    query: bytes = b""  # the query sent upstream (the shared health cache sends none)
    # ---------------------------------------------------------------- the exchange's state
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    attempts: int = 0
    body_error: GatewayError | None = None
    body_complete: bool = False  # the whole request body has been received
    client_gone: bool = False
    upstream_seconds: float | None = None
    fallback: str | None = None  # the hops of a fallback chain that answered (SPEC §19)
    chosen: TargetView | None = None  # the last attempt's target (X-VX11-Target, SPEC §18)
    holds: TargetView | None = None  # the target whose in-flight count this call holds
    session_key: str | None = None  # Context-7's session id, for lb=session

    @property
    def correlation_id(self) -> str:
        return self.request.cid

    @property
    def client_ip(self) -> str:
        return self.request.client_ip

    @property
    def length(self) -> int | None:
        """The declared Content-Length, parsed once."""
        return self.request.length

    @property
    def upstream_path_key(self) -> str:
        """The path as the client named it (the /shub cache key and metrics label)."""
        return (
            SHUB_PREFIX + self.upstream_path
            if self.kind == "shub" and gw.shub_strip_prefix
            else self.upstream_path
        )

    @property
    def target(self) -> str:
        """Path and query as they go upstream (after the module URL's own path)."""
        if self.query:
            return self.upstream_path + "?" + self.query.decode("latin-1")
        return self.upstream_path

    @property
    def unavailable(self) -> type[UpstreamUnavailable]:
        return ShubUnavailable if self.kind == "shub" else UpstreamUnavailable

    def upstream_headers(self, *, body_is_bytes: bool = False) -> list[tuple[str, str]]:
        """The client's headers minus hop-by-hop and gateway credentials, plus ours
        (``gateway.upstream.hop.request_headers``: one pass). ``body_is_bytes``: the
        body goes as bytes, whose ``Content-Length`` the gateway's HTTP client (h1) sets itself."""
        request = self.request
        settings = edge()
        return hop.request_headers(
            request.headers,
            settings.drop_upstream,
            request.listed(),
            settings.cookie_names,
            drop_authorization=self.drop_authorization,
            drop_length=body_is_bytes,
            forwarded=[
                ("X-Correlation-ID", request.cid),
                ("X-Forwarded-For", request.forwarded_chain),
                ("X-Forwarded-Proto", request.forwarded_scheme),
                ("X-Forwarded-Host", request.forwarded_host),
                ("X-Forwarded-By", "vx11-gateway"),
            ],
        )
