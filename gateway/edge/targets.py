"""The target of each attempt (SPEC §18): chosen, counted in flight, its outcome reported.

Per attempt, :func:`pick` asks the module's pool (``svc.balancer``, through the seam's
``choose_target``) for a target — the session key for ``lb=session``, the targets this
request already tried as ``exclude`` (SPEC §7: a retry goes elsewhere) — and counts it in
flight (``call.holds``) until the exchange is over: a failed attempt gives it back before
the next one (:func:`drop`), the last one when its answer is done (``exchange.slot`` on the
way out, after the answer's body was written). ``call.chosen`` stays: it names the target
in ``X-VX11-Target``, the access log and the client span.

Each attempt's outcome is counted (``vx11_target_requests_total``) and, for a pool of
several targets, reported to the outlier detector (``svc.outliers``) when it is a gateway
failure or the first success after one: :func:`counted` decides without awaiting (a healthy
request makes no store call and creates no coroutine), :func:`report` sends it. A pool of
one target is never ejected (the pool would panic back onto it): nothing is reported.
"""

from __future__ import annotations

from gateway.core import metrics
from gateway.edge import tracing
from gateway.edge.auth import AUTH_DISABLED
from gateway.edge.call import Call
from gateway.operations import registry as services
from gateway.policies.balancer import SESSION, Pool, TargetView
from gateway.policies.outlier import GATEWAY_FAILURES
from gateway.upstream import OutboundRequest, choose_target


def session_key(call: Call) -> str | None:
    """``lb=session``'s key: the Context-7 session id, else ``X-VX11-Session``, else the
    client principal — but not a shared one (every anonymous caller, every caller when
    authentication is off): those have no key and go by least request (SPEC §18)."""
    found = call.session_key or call.request.session
    if found:
        return found
    principal = call.principal
    if not principal.authenticated or principal is AUTH_DISABLED:
        return None
    return principal.id


def pick(
    call: Call,
    svc: services.Services,
    pool: Pool,
    outbound: OutboundRequest,
    tried: tuple[str, ...],
) -> TargetView:
    """The target of the next attempt, held in flight (``call.holds``) until :func:`drop`."""
    held = call.holds
    if held is not None:
        held.release()
    enabled = pool.enabled
    if len(enabled) == 1:
        target = enabled[0]
    else:
        info = call.module
        now = svc.outliers.keep_fresh(info.name)  # its view reloaded each second, off the path
        key = session_key(call) if info.lb == SESSION else None
        target = choose_target(pool, outbound, info.lb, now, key=key, exclude=tried)
    target.acquire()
    call.chosen = call.holds = target
    return target


def drop(call: Call) -> None:
    """The held target's attempt is over (no-op when none is held)."""
    held = call.holds
    if held is not None:
        held.release()
        call.holds = None


def is_failure(status: int) -> bool:
    return status in GATEWAY_FAILURES


def counted(call: Call, svc: services.Services, status: int, failure: bool) -> Pool | None:
    """Count the attempt's outcome on its target; the pool when the outlier detector must
    hear of it (:func:`report`), else ``None`` (the common case: no await)."""
    chosen = call.chosen
    if chosen is None:
        return None
    info = call.module
    metrics.target_request(info.name, chosen.key, status)
    if len(info.targets) < 2 or not (failure or svc.outliers.suspect(info.name, chosen.key)):
        return None
    pool = svc.balancer.pool(info.name, info.targets)
    return pool if len(pool.enabled) > 1 else None


async def report(call: Call, svc: services.Services, pool: Pool, failure: bool) -> None:
    """The attempt's outcome to the outlier detector; an ejection is a span event."""
    chosen = call.chosen
    assert chosen is not None
    event = await svc.outliers.outcome(pool, chosen.key, failure=failure)
    if event is not None and event.ejected and tracing.enabled:
        tracing.event(
            "vx11.ejection",
            module=event.module,
            target=event.target,
            until=event.until,
            ejections=event.count,
        )


async def outcome(call: Call, svc: services.Services, status: int, failure: bool) -> None:
    """:func:`counted`, then :func:`report` when needed (paths that are not the hot one)."""
    pool = counted(call, svc, status, failure)
    if pool is not None:
        await report(call, svc, pool, failure)


__all__ = ["counted", "drop", "is_failure", "outcome", "pick", "report", "session_key"]
