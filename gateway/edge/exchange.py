"""The upstream step of the pipeline: a backpressure slot, then breaker → seam × attempts.

:func:`forward` sends the call through the upstream seam (``gateway.upstream.send``: the
seam chooses the target and the transport) and returns the answer of the last attempt
together with its breaker permit, whose outcome is **not** recorded yet: the answer's
reader records it once, with ``gateway.edge.answer.settle``, when the body has been read
(a body that breaks off is a failure), or gives it back (the client left). An attempt
that failed finally is recorded here; one that is retried gives its permit back instead —
the breaker counts a request's last attempt only (SPEC §18) — and goes to another target of
the module's pool when it has one (``gateway.edge.targets``: every attempt's outcome goes to
the target's outlier detector).

What the client does is never the module's failure: an upstream call that failed because
the client left mid-upload, sent too much or stopped sending (``call.client_gone`` /
``call.body_error``), or that was refused before a byte went out (``InvalidRequest``),
gives its permit back without an outcome and is not retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from gateway.config.modules import ModuleInfo
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
from gateway.edge import targets, tracing
from gateway.edge.body import ClientGone
from gateway.edge.call import Call
from gateway.operations import registry as services
from gateway.policies.backpressure import (
    Overloaded,
    PriorityLimiter,
    QueueTimeout,
    priority_from_name,
)
from gateway.policies.balancer import Pool
from gateway.policies.breaker import Permit
from gateway.policies.retry import RETRY_STATUSES, RetryBudget, may_retry_request, next_delay
from gateway.upstream import Body, OutboundRequest, UpstreamResponse, send

#: The failures of an attempt that the breaker counts and a retry may follow.
_MODULE_FAILURES = (UpstreamUnavailable, UpstreamTimeout, BadGateway)


class slot:
    """Holds the module's bulkhead slot (when it has a cap, SPEC §10), then one of the
    ``VX11_MAX_INFLIGHT`` process slots, for the whole exchange; released in reverse.

    The module's first: a module at its cap waits in its own queue holding no process
    slot (``gateway.policies.bulkheads``). ``module``: whose bulkhead (default: the call's
    module; a fallback option passes its own). No cap: one attribute check, no limiter.
    """

    __slots__ = ("bulkhead", "call", "limiter", "module")

    def __init__(
        self, call: Call, svc: services.Services, module: ModuleInfo | None = None
    ) -> None:
        self.call = call
        self.limiter = svc.backpressure
        info = call.module if module is None else module
        self.module = info.name
        cap = info.max_concurrent
        self.bulkhead = svc.bulkheads.get(info.name, cap) if cap else None

    async def __aenter__(self) -> None:
        priority = priority_from_name(self.call.priority)
        bulkhead = self.bulkhead
        if bulkhead is not None:
            await self._wait(bulkhead, priority, self.module)
            metrics.module_inflight(self.module, bulkhead.inflight)
        try:
            await self._wait(self.limiter, priority, None)
        except BaseException:
            if bulkhead is not None:
                self._give_back(bulkhead)
            raise
        metrics.INFLIGHT.inc()

    async def _wait(self, limiter: PriorityLimiter, priority: int, module: str | None) -> None:
        """One limiter's slot; shed (``module``: by that module's cap) or past the deadline."""
        try:
            await limiter.acquire(priority, deadline=self.call.deadline)
        except Overloaded as exc:
            metrics.shed(self.call.priority)
            raise ServiceOverloaded(
                exc.retry_after, module=module, priority=self.call.priority
            ) from None
        except QueueTimeout:
            metrics.shed(self.call.priority)
            raise UpstreamTimeout("The request waited for capacity past its deadline.") from None

    async def __aexit__(self, *exc: object) -> None:
        targets.drop(self.call)  # the last attempt's target: its answer is done
        metrics.INFLIGHT.dec()
        self.limiter.release()
        if self.bulkhead is not None:
            self._give_back(self.bulkhead)

    def _give_back(self, bulkhead: PriorityLimiter) -> None:
        bulkhead.release()
        metrics.module_inflight(self.module, bulkhead.inflight)


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
    call: Call,
    body: Body,
    svc: services.Services,
    first_permit: Permit | None = None,
    head_only: bool = False,
) -> tuple[UpstreamResponse, Permit]:
    """The upstream exchange through breaker and retries; the answer's body is not read yet
    and its permit comes back unrecorded (see the module's doc). ``first_permit``: the
    breaker's answer for the first attempt, when the admission step already obtained it.

    Each attempt goes to a target of the module's pool (``gateway.edge.targets.pick``); a
    retry avoids the targets already tried. Only the request's last attempt is recorded in
    the breaker (SPEC §18); every attempt is reported to the outlier detector.
    ``head_only``: ``call.deadline`` bounds the answer's head only, its reader the body (a
    fallback option's share, SPEC §19; streaming routes always)."""
    in_memory = body is None or isinstance(body, bytes)
    outbound = _outbound(call, body, head_only)
    module = call.module.name
    breaker, budget = svc.breaker, svc.budget
    pool = await _pool(call, svc, first_permit)
    can_retry = in_memory and retryable(call)
    budget.note_request(module)
    holding_retry = False
    tried: tuple[str, ...] = ()
    try:
        while True:
            call.attempts += 1
            permit, started = await _admit(call, svc, outbound, first_permit)
            error: GatewayError | None = None
            response: UpstreamResponse | None = None
            target = targets.pick(call, svc, pool, outbound, tried)
            try:
                response = await attempt(call, outbound)
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
            tried += (target.key,)
            await _failed(call, svc, permit, response, error, delay)
    finally:
        if holding_retry:
            budget.release_retry(module)


async def _admit(
    call: Call, svc: services.Services, outbound: OutboundRequest, first_permit: Permit | None
) -> tuple[Permit, float]:
    """The breaker's permit for this attempt (the admission step's for the first) and the
    attempt's start, its timeout set to what is left of the route's deadline."""
    module = call.module.name
    permit = (
        first_permit
        if first_permit is not None and call.attempts == 1
        else await svc.breaker.acquire(module)
    )
    if not permit.allowed:
        raise refused(module, permit)
    started = time.monotonic()
    outbound.timeout = call.deadline - started
    if outbound.timeout <= 0:
        await svc.breaker.release(module, permit)
        raise UpstreamTimeout("The route's deadline passed before the module answered.")
    return permit, started


def _outbound(call: Call, body: Body, head_only: bool) -> OutboundRequest:
    return OutboundRequest(
        call.method,
        call.target,
        call.upstream_headers(body_is_bytes=isinstance(body, bytes)),
        body,
        0.0,  # set per attempt: what is left of the route's deadline
        call.unavailable,
        head_only or (call.route is not None and call.route.streaming),  # SPEC §19, §20
    )


async def _pool(call: Call, svc: services.Services, first_permit: Permit | None) -> Pool:
    """The module's pool (this process's); no enabled target: unavailable (503) at once."""
    info = call.module
    pool = svc.balancer.pool(info.name, info.targets)
    if not pool.enabled:
        if first_permit is not None:
            await svc.breaker.release(info.name, first_permit)
        raise call.unavailable(f"The module {info.name} has no enabled target.")
    return pool


def attempt(call: Call, outbound: OutboundRequest) -> Awaitable[UpstreamResponse]:
    """The seam for one attempt; inside its client span when tracing is on (SPEC §22). A
    plain function returning the coroutine: tracing off costs one attribute test."""
    if tracing.enabled:
        return tracing.send(call, outbound)
    chosen = call.chosen
    return send(call.module, outbound, origin=chosen.url if chosen is not None else None)


def refused(module: str, permit: Permit) -> CircuitOpen:
    """The breaker's refusal of an attempt (a span event when tracing is on)."""
    if tracing.enabled:
        tracing.event("vx11.circuit_open", module=module, state=permit.state)
    return CircuitOpen(module, permit.retry_after, permit.state)


async def _failed(
    call: Call,
    svc: services.Services,
    permit: Permit,
    response: UpstreamResponse | None,
    error: GatewayError | None,
    delay: float | None,
) -> None:
    """An attempt that failed, or whose answer is retried: its outcome goes to the target's
    outlier detector; to the breaker only when it is the request's last (no ``delay``: its
    error is raised), a retried attempt's permit is given back (SPEC §18). Then the next
    attempt is waited for."""
    module = call.module.name
    status = response.status if response is not None else None
    if delay is None:
        await svc.breaker.record(
            module, status=status, error=error is not None, probe_id=permit.probe_id, permit=permit
        )
    else:
        await svc.breaker.release(module, permit)
    code = status if status is not None else error.status if error is not None else 502
    await targets.outcome(call, svc, code, error is not None or targets.is_failure(code))
    targets.drop(call)
    if delay is None:
        assert error is not None
        raise error
    if response is not None:
        response.close()
    metrics.retry(module)
    if tracing.enabled:
        tracing.event(
            "vx11.retry",
            module=module,
            attempt=call.attempts,
            delay_s=round(delay, 3),
            reason=error.code if error is not None else str(response.status if response else ""),
        )
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
