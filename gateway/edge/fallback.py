"""Fallback chains (SPEC §19): the route's module, then each fallback, until one answers.

A route with ``fallbacks`` goes here instead of straight to ``exchange.forward``. Each
option — the primary with its own retries, then each fallback in order — takes its own
backpressure slot and bulkhead (``exchange.slot`` with the option's module), asks its own
breaker and gets a share of the route's deadline; the same body (Context-7's enriched one
included) and correlation id go to every option; the client's rate limits were charged
once, before any of them.

The next option is tried when an option's failure is one of the route's triggers
(``fallback_on``; :func:`gateway.config.fallbacks.triggers`):

- ``circuit_open`` / ``overloaded`` — its breaker or bulkhead refused it (nothing sent);
- ``unavailable`` / ``timeout`` — no connection, or no answer's head within its share;
- ``5xx`` — an answer whose status is in its breaker's failure set (500, 502, 503, 504 by
  default; a 502 without a valid answer too); ``429`` — when the route opts in.

The head decides: once an option's head is in and it is not a trigger, that option
answers, and nothing of a body is ever buffered to make the choice (a stream falls back
only before its first byte; a body sent to the client is never replayed elsewhere). A
failure answer (a 503 and its small body) is read, recorded in its breaker and kept: when
every option failed the client gets the primary's error, status and body — or the
primary's problem. A non-trigger failure of a fallback ends the chain the same way; an
answer of a fallback that is no trigger (a 4xx) is its answer.

Deadline shares: option *i* of *n* may use ``(deadline - now) / (n - i)``: the primary gets
``timeout / n``, and the time an option did not use passes to the ones after it (a
primary refused in a millisecond leaves nearly the whole timeout to its fallback). The
share bounds the answer's head (each option is asked ``head_only``); the body of the answer
chosen may run to the route's deadline (``UpstreamResponse.bound``; a streaming route's is
bounded by its stream timers), a failure answer's body is read within the option's share.
The route's ``timeout`` stays the bound of the whole chain.

The answer names the module that answered (``X-VX11-Module``) and each hop taken
(``X-VX11-Fallback: unavailable; from=switch``; a list, one member per hop, when more
than one fallback was needed); every hop is counted in ``vx11_fallbacks_total``.
"""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass

from gateway.config.fallbacks import triggers
from gateway.config.modules import ModuleInfo
from gateway.core import metrics
from gateway.core.asgi import Receive, Send
from gateway.core.problems import (
    BadGateway,
    CircuitOpen,
    GatewayError,
    ServiceOverloaded,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.edge import tracing
from gateway.edge.answer import SMALL_ANSWER, read_answer, send_buffered, stream_response
from gateway.edge.call import Call
from gateway.edge.exchange import forward, slot
from gateway.operations import registry as services
from gateway.policies.breaker import Permit
from gateway.upstream import Body, UpstreamResponse

#: The triggers whose option was refused before a byte of the request went out: the only
#: ones a body streamed from the client (not replayable) may still fall back on.
BEFORE_SENDING = frozenset({"circuit_open", "overloaded"})
#: A failure answer kept for the client (the primary's error) is read up to this size.
ERROR_BODY_LIMIT = SMALL_ANSWER

log = logging.getLogger("gateway.proxy")


@dataclass(slots=True)
class Buffered:
    """An answer read whole: a failure answer kept for the client, or one for Context-7."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None


@dataclass(slots=True)
class Failed:
    """An option that could not answer: the trigger, and what the client would get."""

    reason: str
    error: GatewayError | None = None  # raised, or …
    answer: Buffered | None = None  # … the module's failure answer


# Not frozen (made per request; docs/PERFORMANCE.md "fourth pass"), never changed.
@dataclass(slots=True)
class Option:
    module: ModuleInfo
    path: str
    method: str


Live = tuple[UpstreamResponse, Permit]


def has_fallbacks(call: Call) -> bool:
    return call.route is not None and bool(call.route.fallbacks)


def options(call: Call) -> list[Option]:
    """The primary, then each fallback whose module is configured and enabled now."""
    assert call.route is not None
    chain = [Option(call.module, call.upstream_path, call.method)]
    modules = call.snapshot.modules
    for fb in call.route.fallbacks:
        module = modules.get(fb.module)
        if module is not None and module.enabled:
            chain.append(Option(module, fb.endpoint, fb.method or call.route.method))
    return chain


def error_reason(exc: GatewayError) -> str | None:
    """The trigger a raised failure is (``None``: never a fallback: the client's fault, a
    request that cannot be written…)."""
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    if isinstance(exc, ServiceOverloaded):
        return "overloaded"
    if isinstance(exc, UpstreamUnavailable):
        return "unavailable"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, BadGateway):
        return "5xx"
    return None


def status_reason(svc: services.Services, module: str, status: int) -> str | None:
    """The trigger an answer's status is: ``5xx`` (its breaker's failure set), ``429``."""
    if status == 429:
        return "429"
    if status >= 500 and status in svc.breaker.config_for(module).failure_statuses:
        return "5xx"
    return None


async def serve(
    call: Call,
    body: Body,
    svc: services.Services,
    permit: Permit | None,
    send: Send,
    receive: Receive,
) -> None:
    """``pipeline.handle`` for a route with fallbacks: the answering option's answer is
    streamed (its slot held meanwhile), or the primary's failure answer sent."""
    async with AsyncExitStack() as held:
        answer = await choose(call, body, svc, permit, held)
        if isinstance(answer, Buffered):
            await send_buffered(call, send, answer.status, answer.headers, answer.body)
        else:
            await stream_response(call, answer[0], send, receive, svc, answer[1])


async def fetch(call: Call, body: Body, svc: services.Services, limit: int) -> Buffered:
    """The answer read whole (Context-7 chat): the answering option's, or the primary's
    failure answer."""
    async with AsyncExitStack() as held:
        answer = await choose(call, body, svc, None, held)
        if isinstance(answer, Buffered):
            return answer
        response, permit = answer
        data = await read_answer(call, svc, response, permit, limit)
        return Buffered(response.status, response.headers, data)


async def choose(
    call: Call, body: Body, svc: services.Services, first: Permit | None, held: AsyncExitStack
) -> Live | Buffered:
    """Try the options in order; the first that answers is returned with its slot pushed
    onto ``held``. All failed: the primary's failure answer, or its error raised."""
    chain = options(call)
    overall = call.deadline
    if len(chain) == 1:  # no fallback usable now: the ordinary exchange
        return await _try_live(call, body, svc, first, held)
    route = call.route
    assert route is not None
    wanted = triggers(route.fallback_on)
    replayable = body is None or isinstance(body, bytes)
    primary: Failed | None = None
    primary_target = call.chosen
    last: Failed | None = None
    hops: list[str] = []
    attempts = 0
    for index, option in enumerate(chain):
        if last is not None:
            attempts += call.attempts
            _hop(call, chain[index - 1].module.name, option, last.reason, hops)
        now = time.monotonic()
        call.deadline = min(overall, now + (overall - now) / (len(chain) - index))
        try:
            permit = first if index == 0 else None
            outcome = await _try(call, body, svc, permit, held, wanted, overall)
        except GatewayError as exc:
            if index == 0 or call.client_gone or call.body_error is not None:
                call.deadline = overall
                raise
            log.warning(  # the chain ends: the client gets the primary's failure
                "fallback %s failed (%s): not one of the route's triggers",
                option.module.name,
                exc.code,
                extra={"fallback": option.module.name, "error": exc.code},
            )
            break
        if not isinstance(outcome, Failed):
            call.attempts += attempts
            call.deadline = overall
            if hops:
                value = ", ".join(hops)
                call.fallback = value
                call.response_headers.append((b"x-vx11-fallback", value.encode("latin-1")))
            return outcome
        last = outcome
        if primary is None:
            primary = outcome
            primary_target = call.chosen  # named in the answer if every option fails
        if not replayable and outcome.reason not in BEFORE_SENDING:
            break  # the streamed body went to this option: it cannot be sent again
    assert primary is not None
    call.chosen = primary_target
    return _primary_error(call, chain[0], primary, attempts, overall)


def _hop(call: Call, previous: str, option: Option, reason: str, hops: list[str]) -> None:
    """Move the call to ``option``: counted, named in the answer, its attempts anew."""
    assert call.route is not None
    metrics.fallback(call.route.intent, previous, option.module.name, reason)
    if tracing.enabled:
        tracing.event(
            "vx11.fallback", reason=reason, from_module=previous, to_module=option.module.name
        )
    hops.append(f"{reason}; from={previous}")
    call.module, call.upstream_path, call.method = option.module, option.path, option.method
    call.attempts = 0


def _primary_error(
    call: Call, option: Option, failed: Failed, attempts: int, overall: float
) -> Buffered:
    """Every option failed: the call is the primary's again, and so is the answer."""
    call.attempts += attempts
    call.deadline = overall
    call.module, call.upstream_path, call.method = option.module, option.path, option.method
    if failed.error is not None:
        raise failed.error
    assert failed.answer is not None
    return failed.answer


async def _try_live(
    call: Call, body: Body, svc: services.Services, first: Permit | None, held: AsyncExitStack
) -> Live:
    await held.enter_async_context(slot(call, svc, call.module))
    return await forward(call, body, svc, first)


async def _try(
    call: Call,
    body: Body,
    svc: services.Services,
    first: Permit | None,
    held: AsyncExitStack,
    wanted: frozenset[str],
    overall: float,
) -> Live | Failed:
    """One option: its answer (its slot pushed onto ``held``), or why it failed; a failure
    that is no trigger is raised.

    Its share (``call.deadline``) bounds the answer's head (``head_only``) and a failure
    answer's body; the body of the answer chosen may run to the route's ``overall``
    deadline (a streaming route's is bounded by its stream timers instead)."""
    module = call.module
    taken = slot(call, svc, module)
    entered = False
    try:
        await taken.__aenter__()
        entered = True
        response, permit = await forward(call, body, svc, first, head_only=True)
    except GatewayError as exc:
        if entered:
            await taken.__aexit__(None, None, None)
        elif first is not None:  # the slot refused: the admission's permit is unused
            await svc.breaker.release(module.name, first)
        reason = error_reason(exc)
        if reason is None or reason not in wanted:
            raise
        return Failed(reason, error=exc)
    except BaseException:
        if entered:
            await taken.__aexit__(None, None, None)
        raise
    reason = status_reason(svc, module.name, response.status)
    if reason is None or reason not in wanted:
        if call.route is None or not call.route.streaming:
            response.bound(overall - time.monotonic())
        held.push_async_exit(taken)
        return response, permit
    try:  # a failure answer: recorded in its breaker, kept for the client
        response.bound(call.deadline - time.monotonic())  # a stalled body: a timeout
        data = await read_answer(call, svc, response, permit, ERROR_BODY_LIMIT)
    except GatewayError as exc:
        return Failed(reason, error=exc)
    finally:
        await taken.__aexit__(None, None, None)
    return Failed(reason, answer=Buffered(response.status, response.headers, data))
