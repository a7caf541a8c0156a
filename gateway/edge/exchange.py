"""The upstream step of the pipeline: a backpressure slot, then breaker → seam × attempts.

:func:`forward` sends the call through the upstream seam (``gateway.upstream.send``: the
seam chooses the target and the transport) and returns the answer of the last attempt
together with its breaker permit, whose outcome is **not** recorded yet: the answer's
reader records it once, with ``gateway.edge.answer.settle``, when the body has been read
(a body that breaks off is a failure), or gives it back (the client left). An attempt
that failed or is retried is recorded here.

What the client does is never the module's failure: an upstream call that failed because
the client left mid-upload, sent too much or stopped sending (``call.client_gone`` /
``call.body_error``), or that was refused before a byte went out (``InvalidRequest``),
gives its permit back without an outcome and is not retried.
"""

from __future__ import annotations

import asyncio
import time

from gateway.core import metrics
from gateway.core.conf import gw
from gateway.core.problems import (
    BadGateway,
    CircuitOpen,
    GatewayError,
    ServiceOverloaded,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.edge.body import ClientGone
from gateway.edge.call import Call
from gateway.operations import registry as services
from gateway.policies.backpressure import Overloaded, QueueTimeout, priority_from_name
from gateway.policies.breaker import Permit
from gateway.policies.retry import RETRY_STATUSES, RetryBudget, may_retry_request, next_delay
from gateway.upstream import Body, OutboundRequest, UpstreamResponse, send

#: The failures of an attempt that the breaker counts and a retry may follow.
_MODULE_FAILURES = (UpstreamUnavailable, UpstreamTimeout, BadGateway)


class slot:
    """Holds one of ``VX11_MAX_INFLIGHT`` upstream slots for the whole exchange."""

    def __init__(self, call: Call, svc: services.Services) -> None:
        self.call = call
        self.limiter = svc.backpressure

    async def __aenter__(self) -> None:
        priority = priority_from_name(self.call.priority)
        try:
            await self.limiter.acquire(priority, deadline=self.call.deadline)
        except Overloaded as exc:
            metrics.shed(self.call.priority)
            raise ServiceOverloaded(exc.retry_after, priority=self.call.priority) from None
        except QueueTimeout:
            metrics.shed(self.call.priority)
            raise UpstreamTimeout("The request waited for capacity past its deadline.") from None
        metrics.INFLIGHT.inc()

    async def __aexit__(self, *exc: object) -> None:
        metrics.INFLIGHT.dec()
        self.limiter.release()


def retryable(call: Call) -> bool:
    if gw.retry_max <= 0:
        return False
    allows_post = call.route.retry_post if call.route is not None else False
    return may_retry_request(
        call.method,
        idempotency_key=call.request.idempotency_key is not None,
        route_allows_post_retry=allows_post,
    )


async def forward(
    call: Call, body: Body, svc: services.Services, first_permit: Permit | None = None
) -> tuple[UpstreamResponse, Permit]:
    """The upstream exchange through breaker and retries; the answer's body is not read yet
    and its permit comes back unrecorded (see the module's doc). ``first_permit``: the
    breaker's answer for the first attempt, when the admission step already obtained it."""
    in_memory = body is None or isinstance(body, bytes)
    outbound = OutboundRequest(
        call.method,
        call.target,
        call.upstream_headers(body_is_bytes=isinstance(body, bytes)),
        body,
        0.0,  # set per attempt: what is left of the route's deadline
        call.unavailable,
    )
    module = call.module.name
    breaker, budget = svc.breaker, svc.budget
    can_retry = in_memory and retryable(call)
    budget.note_request(module)
    holding_retry = False
    try:
        while True:
            call.attempts += 1
            permit = (
                first_permit
                if first_permit is not None and call.attempts == 1
                else await breaker.acquire(module)
            )
            if not permit.allowed:
                raise CircuitOpen(module, permit.retry_after, permit.state)
            started = time.monotonic()
            outbound.timeout = call.deadline - started
            if outbound.timeout <= 0:
                await breaker.release(module, permit)
                raise UpstreamTimeout("The route's deadline passed before the module answered.")
            error: GatewayError | None = None
            response: UpstreamResponse | None = None
            try:
                response = await send(call.module, outbound)
            except _MODULE_FAILURES as exc:
                error = exc
            except (GatewayError, ClientGone):  # InvalidRequest: nothing was sent
                await breaker.release(module, permit)
                raise
            call.upstream_seconds = time.monotonic() - started
            if holding_retry:
                budget.release_retry(module)
                holding_retry = False
            if error is not None and client_caused(call, body, error):
                await breaker.release(module, permit)
                raise error  # rendered as the body's own error (or not at all: 499)
            delay = retry_delay(call, response, error, budget) if can_retry else None
            holding_retry = delay is not None
            if response is not None and delay is None:
                return response, permit  # recorded once its body is read (settle)
            await _failed(call, svc, permit, response, error, delay)
    finally:
        if holding_retry:
            budget.release_retry(module)


async def _failed(
    call: Call,
    svc: services.Services,
    permit: Permit,
    response: UpstreamResponse | None,
    error: GatewayError | None,
    delay: float | None,
) -> None:
    """An attempt that failed, or whose answer is retried: its outcome is recorded, then
    its error raised (no ``delay``: no retry) or the next attempt waited for."""
    module = call.module.name
    await svc.breaker.record(
        module,
        status=None if response is None else response.status,
        error=error is not None,
        probe_id=permit.probe_id,
        permit=permit,
    )
    if delay is None:
        assert error is not None
        raise error
    if response is not None:
        response.close()
    metrics.retry(module)
    await asyncio.sleep(delay)


def client_caused(call: Call, body: Body, error: GatewayError) -> bool:
    """Whether an attempt's failure is the client's doing, not the module's.

    The client left, sent too much or stopped sending; or the module was reached but the
    exchange timed out or broke while the client's streamed upload was still under way: a
    slow (but moving) upload would otherwise let any client open the breaker. A connect
    failure still counts. (nginx never lets an upload touch the module: it buffers it.)
    """
    return (
        call.client_gone
        or call.body_error is not None
        or (
            body is not None
            and not isinstance(body, bytes)
            and not call.body_complete
            and not isinstance(error, UpstreamUnavailable)
        )
    )


def retry_delay(
    call: Call,
    response: UpstreamResponse | None,
    error: GatewayError | None,
    budget: RetryBudget,
) -> float | None:
    """How long to wait before the next attempt (a retry from the budget is then held),
    or ``None``: the attempt's outcome is final."""
    retry_worthy = isinstance(error, UpstreamUnavailable) or (
        response is not None and response.status in RETRY_STATUSES
    )
    if not retry_worthy or call.attempts > gw.retry_max:
        return None
    delay = next_delay(
        call.attempts,
        response.header("Retry-After") if response else None,
        call.deadline,
        time.monotonic(),
        wall_now=time.time(),
    )
    if delay is not None and budget.try_acquire_retry(call.module.name):
        return delay
    return None
