"""Rate-limit operations: charge a management request, preview a caller's usage.

The edge endpoints (``gateway.api.edge``) count ``/shub`` management calls as the proxy
does (:func:`charge`) and answer ``GET /vx11/rate-limit/status`` (:func:`usage`) with the
limiter of the running event loop, so both see the very log the proxy writes. The caller
passes the scopes (``build_scopes``: who is asking, from which address) as a function,
called only when rate limiting is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from gateway.core import metrics
from gateway.core.conf import gw
from gateway.core.problems import TooManyRequests
from gateway.operations import registry
from gateway.policies.ratelimit import Scope, ratelimit_headers

Scopes = Callable[[], Sequence[Scope]]


async def charge(scopes: Scopes) -> list[tuple[str, str]]:
    """Count one request against its limits; the rate-limit headers, or 429."""
    if not gw.rate_limit_enabled:
        return []
    decision = await registry.get().limiter.check(scopes())
    headers = ratelimit_headers(decision)
    if decision.would_refuse and decision.refused_by is not None:
        metrics.rate_limited(decision.refused_by.name)
    if not decision.allowed:
        scope = decision.refused_by.name if decision.refused_by else "token"
        raise TooManyRequests(scope, decision.retry_after, headers)
    return headers


async def usage(scopes: Scopes) -> dict[str, Any]:
    """The caller's usage per scope, consuming nothing (``GET /vx11/rate-limit/status``)."""
    enabled = gw.rate_limit_enabled
    body: dict[str, Any] = {
        "enabled": enabled,
        "enforced": enabled and gw.rate_limit_enforce,
        "degraded": False,
        "scopes": [],
    }
    if enabled:
        limiter = registry.get().limiter
        decision = await limiter.status(scopes())
        body["degraded"] = decision.degraded or limiter.degraded
        body["scopes"] = [
            {
                "scope": r.scope.name,
                "limit": r.scope.limit,
                "remaining": r.remaining,
                "reset": math.ceil(round(r.reset, 6)),
                "window": r.scope.window,
            }
            for r in decision.results
        ]
    return body
