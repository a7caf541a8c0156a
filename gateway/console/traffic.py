"""``GET /vx11/traffic?minutes=15``: the dashboard graphs' data (SPEC §14).

Per module, one point per 10 s bucket over the last ``minutes`` (1 to 15): requests,
requests per second, error %, p50/p99 latency (ms) and rate-limit rejections, summed over
every process when Redis is configured (``gateway.operations.traffic``); and ``bulkheads``:
each module with a ``max_concurrent`` cap, its calls in flight and queued in the process
that answers (a cap is per process). The same callers
as ``/ws/events``: a staff session, or an admin token (``X-VX11-Token`` /
``Authorization: Bearer``); others get problem+json 401/403.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse

from gateway.config.snapshot import holder
from gateway.console.middleware import problem_response
from gateway.core import correlation
from gateway.core.conf import gw
from gateway.core.problems import AuthRequired, Forbidden, GatewayError
from gateway.edge import auth
from gateway.operations import registry
from gateway.operations.traffic import traffic


async def _refusal(request: HttpRequest) -> GatewayError | None:
    token = auth.client_token(
        request.headers.get("X-VX11-Token"), request.headers.get("Authorization")
    )
    if token is not None:
        if not gw.auth_enabled:
            return None
        principal = auth.authenticate(token, await holder.current())
        if principal is None:
            return AuthRequired("The token is not valid.")
        return None if principal.is_admin else Forbidden("This needs an admin token.")
    user = await request.auser()
    if user.is_authenticated:
        if user.is_active and user.is_staff:
            return None
        return Forbidden("This needs a staff account.")
    return None if not gw.auth_enabled else AuthRequired("Log in to the admin or send a token.")


async def traffic_view(request: HttpRequest) -> HttpResponse:
    refused = await _refusal(request)
    if refused is not None:
        return problem_response(refused, correlation.current.get())
    raw = request.GET.get("minutes", "15")
    minutes = int(raw) if raw.isdigit() else 15
    body = await traffic.series(minutes)
    # Each capped module's bulkhead, in this process (its cap is per process too).
    body["bulkheads"] = registry.bulkhead_view((await holder.current()).modules)
    response = JsonResponse(body)
    response["Cache-Control"] = "no-store"
    return response
