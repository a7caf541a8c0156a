"""The request pipeline shared by every proxied call.

    auth (proxy.build_call) → rate limit → [cache | Context-7] → backpressure
        → (breaker → upstream) × attempts → record

Each step is a plain async function over a :class:`~gateway.edge.proxy.Call`; the
policies themselves live in ``gateway.policies`` and are reached through
:mod:`gateway.operations.registry`. Reading and writing the answer, and recording the attempt's
breaker outcome once its body is known, is :mod:`gateway.edge.answer`. Errors are raised as ``gateway.core.problems`` exceptions and
rendered in one place (``ProxyApp``).
"""

from __future__ import annotations

import asyncio
import time

from gateway.core import metrics
from gateway.core.asgi import Receive, Send
from gateway.core.conf import gw
from gateway.core.problems import (
    BadGateway,
    CircuitOpen,
    GatewayError,
    ServiceOverloaded,
    TooManyRequests,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.edge.answer import read_answer, send_buffered, stream_response
from gateway.edge.auth import Principal
from gateway.edge.proxy import Call, ClientGone, read_all, read_small
from gateway.operations import registry as services
from gateway.policies.backpressure import Overloaded, QueueTimeout, priority_from_name
from gateway.policies.breaker import Permit
from gateway.policies.ratelimit import Scope, ratelimit_headers
from gateway.policies.respcache import CachedResponse
from gateway.policies.retry import RETRY_STATUSES, may_retry_request, next_delay
from gateway.upstream import client as upstream
from gateway.upstream.client import Body, UpstreamResponse

CACHED_PATHS = frozenset({"/shub/health", "/shub/ready"})
CACHED_HEADERS = frozenset(
    {b"content-type", b"content-encoding", b"cache-control", b"etag", b"last-modified"}
)
HEALTH_BODY_LIMIT = 1024 * 1024
REPLAY_LIMIT = 1024 * 1024  # bytes of request body kept in memory to allow retries


def replay_fits(call: Call) -> bool:
    """Whether a retryable request's body may be buffered so a retry can resend it.

    Only a declared ``Content-Length`` up to ``REPLAY_LIMIT``: a larger (or chunked,
    unknown-size) body is streamed once, without retries, so memory stays bounded
    whatever ``VX11_MAX_BODY_BYTES`` allows.
    """
    length = call.length
    return length is not None and length <= REPLAY_LIMIT


def has_body(call: Call) -> bool:
    length = call.length
    if length is not None:
        return length > 0
    return any(k == b"transfer-encoding" for k, _ in call.scope["headers"])


def _header(call: Call, name: bytes) -> str | None:
    for key, value in call.scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def handle(call: Call, receive: Receive, send: Send) -> None:
    svc = services.get()
    if (
        call.kind == "shub"
        and call.method == "GET"
        and gw.cache_enabled
        and call.upstream_path_key in CACHED_PATHS
    ):
        await rate_limit(call, svc)
        await serve_cached(call, svc, send)
        return
    if call.route is not None and call.route.context7 and gw.context7_enabled:
        await rate_limit(call, svc)
        await serve_context7(call, svc, receive, send)
        return
    # Straight upstream next: the breaker's permit for the first attempt may come with the
    # rate-limit decision (one store round trip for both; gateway/policies/admission.py).
    permit = await rate_limit(call, svc, upstream_next=True)
    body: Body = await read_small(call, receive) if has_body(call) else None
    if body is not None and not isinstance(body, bytes) and retryable(call) and replay_fits(call):
        body = b"".join([chunk async for chunk in body])  # replayable, at most REPLAY_LIMIT
    if body is None or isinstance(body, bytes):
        call.body_complete = True
    async with slot(call, svc):
        response, permit = await forward(call, body, svc, permit)
        await stream_response(call, response, send, receive, svc, permit)


# --------------------------------------------------------------------------- rate limits


def build_scopes(principal: Principal, client_ip: str, protected: bool) -> list[Scope]:
    """The limits one request is counted against (also read by the status endpoint)."""
    window = int(gw.rate_limit_window)
    scopes = []
    if principal.authenticated:
        scopes.append(
            Scope(
                "token",
                "token:" + principal.id,
                principal.rate_limit or int(gw.rate_limit_token),
                window,
            )
        )
    scopes.append(Scope("ip", "ip:" + client_ip, int(gw.rate_limit_ip), window))
    if protected:
        who = principal.id if principal.authenticated else "ip:" + client_ip
        scopes.append(
            Scope(
                "protected",
                "protected:" + who,
                principal.protected_rate_limit or int(gw.rate_limit_protected),
                window,
            )
        )
    return scopes


async def rate_limit(
    call: Call, svc: services.Services, *, upstream_next: bool = False
) -> Permit | None:
    """Token, IP and protected scopes, decided in one store round trip.

    With ``upstream_next`` the same round trip may also answer the module's breaker for
    the first attempt: that permit is returned (``None``: ``forward`` acquires one).
    """
    if not gw.rate_limit_enabled:
        return None
    scopes = build_scopes(call.principal, call.client_ip, call.protected)
    admitted = await svc.admission.admit(scopes, call.module.name if upstream_next else None)
    decision = admitted.decision
    headers = ratelimit_headers(decision)
    if decision.would_refuse and decision.refused_by is not None:
        metrics.rate_limited(decision.refused_by.name)
    if not decision.allowed:
        scope = decision.refused_by.name if decision.refused_by else "token"
        raise TooManyRequests(scope, decision.retry_after, headers)
    call.response_headers.extend(
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers
    )
    return admitted.permit


# --------------------------------------------------------------------------- backpressure


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


# --------------------------------------------------------------------------- upstream


def retryable(call: Call) -> bool:
    if int(gw.retry_max) <= 0:
        return False
    allows_post = call.route.retry_post if call.route is not None else False
    return may_retry_request(
        call.method,
        idempotency_key=_header(call, b"idempotency-key") is not None,
        route_allows_post_retry=allows_post,
    )


async def forward(
    call: Call, body: Body, svc: services.Services, first_permit: Permit | None = None
) -> tuple[UpstreamResponse, Permit]:
    """The upstream exchange through breaker and retries; the answer's body is not read yet.

    ``first_permit``: the breaker's answer for the first attempt, when the admission step
    already obtained it.

    Returns the answer and the permit of its attempt, whose outcome is **not** recorded
    yet: the caller records it once, with :func:`settle`, when the body has been read
    (a body that breaks off is a failure), or gives it back with ``breaker.release``
    (the client left). An attempt that failed or is retried is recorded here.

    What the client does is never the module's failure: an upstream call that failed
    because the client left mid-upload, sent too much or stopped sending
    (``call.client_gone`` / ``call.body_error``), or that was refused before a byte
    went out (:class:`InvalidRequest`), gives its permit back without an outcome and
    is not retried.
    """
    headers = call.upstream_headers()
    if isinstance(body, bytes):
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    module = call.module.name
    breaker = svc.breaker
    budget = svc.budget
    can_retry = retryable(call) and (body is None or isinstance(body, bytes))
    budget.note_request(module)
    holding_retry = False
    try:
        while True:
            call.attempts += 1
            if first_permit is not None and call.attempts == 1:
                permit = first_permit
            else:
                permit = await breaker.acquire(module)
            if not permit.allowed:
                raise CircuitOpen(module, permit.retry_after, permit.state)
            started = time.monotonic()
            remaining = call.deadline - started
            if remaining <= 0:
                await breaker.release(module, permit)
                raise UpstreamTimeout("The route's deadline passed before the module answered.")
            error: GatewayError | None = None
            response: UpstreamResponse | None = None
            try:
                response = await upstream.send(
                    call.method,
                    call.module.url,
                    call.target,
                    headers,
                    body,
                    remaining,
                    unavailable=call.unavailable,
                )
            except (UpstreamUnavailable, UpstreamTimeout, BadGateway) as exc:
                error = exc
            except (GatewayError, ClientGone):  # InvalidRequest: nothing was sent
                await breaker.release(module, permit)
                raise
            call.upstream_seconds = time.monotonic() - started
            if holding_retry:
                budget.release_retry(module)
                holding_retry = False
            if error is not None and (
                call.client_gone
                or call.body_error is not None
                # The module was reached but the exchange timed out or broke while the
                # client's streamed upload was still under way: a slow (but moving) upload
                # would otherwise let any client open the breaker. A connect failure still
                # counts. (nginx never lets an upload touch the module: it buffers it.)
                or (
                    body is not None
                    and not isinstance(body, bytes)
                    and not call.body_complete
                    and not isinstance(error, UpstreamUnavailable)
                )
            ):
                await breaker.release(module, permit)
                raise error  # rendered as the body's own error (or not at all: 499)
            retry_worthy = isinstance(error, UpstreamUnavailable) or (
                response is not None and response.status in RETRY_STATUSES
            )
            delay = None
            if can_retry and retry_worthy and call.attempts <= int(gw.retry_max):
                delay = next_delay(
                    call.attempts,
                    response.header("Retry-After") if response else None,
                    call.deadline,
                    time.monotonic(),
                    wall_now=time.time(),
                )
                if delay is not None and budget.try_acquire_retry(module):
                    holding_retry = True
                else:
                    delay = None
            if response is not None and delay is None:
                return response, permit  # recorded once its body is read (settle)
            await breaker.record(
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
    finally:
        if holding_retry:
            budget.release_retry(module)


# --------------------------------------------------------------------------- health cache


async def serve_cached(call: Call, svc: services.Services, send: Send) -> None:
    """GET /shub/health and /shub/ready: 2xx answers shared for VX11_CACHE_TTL_HEALTH s."""
    ttl = float(gw.cache_ttl_health)
    # The query string is not part of the key (nginx's ``proxy_cache_key`` without
    # ``$args``): anonymous callers cannot miss the cache at will with ``?1``, ``?2``…
    key = "shub:" + call.upstream_path_key
    # Nor is it sent upstream: the answer is shared by everyone, so the first caller's
    # query (``?verbose=1``) must not choose what every other caller gets for the TTL.
    call.query = b""

    async def fetch() -> CachedResponse:
        async with slot(call, svc):
            response, permit = await forward(call, None, svc)
            body = await read_answer(call, svc, response, permit, HEALTH_BODY_LIMIT)
        headers = tuple(
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in response.headers
            if k.lower() in CACHED_HEADERS
        )
        return CachedResponse(response.status, headers, body, 0.0, ttl)

    value, outcome = await svc.cache.get_or_fetch(key, ttl, fetch)
    assert value is not None
    hit = outcome in ("hit", "stored-by-other")
    metrics.cache_lookup(hit, svc.cache.hits, svc.cache.misses)
    if hit:
        status = f"vx11-gateway; hit; ttl={int(value.ttl_left(time.time()))}"
    elif outcome == "bypass":
        status = "vx11-gateway; fwd=miss; detail=store-unavailable"
    else:
        stored = 200 <= value.status < 300
        status = (
            "vx11-gateway; fwd=miss"
            + ("; stored" if stored else "")
            + ("; collapsed" if outcome == "collapsed" else "")
        )
    call.response_headers += [
        (b"cache-status", status.encode()),
        (b"x-cache", b"HIT" if hit else b"MISS"),
    ]
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in value.headers]
    await send_buffered(call, send, value.status, headers, value.body)


# --------------------------------------------------------------------------- Context-7


async def serve_context7(call: Call, svc: services.Services, receive: Receive, send: Send) -> None:
    """Chat-like routes: the session's context goes upstream, the reply is remembered."""
    from sessions_ctx7 import enrich

    raw = await read_all(call, receive)
    turn = await enrich.begin(call.principal.id, raw, _header(call, b"x-vx11-session"))
    call.response_headers.append((b"x-vx11-session", turn.session_id.encode()))
    async with slot(call, svc):
        response, permit = await forward(call, turn.body, svc)
        body = await read_answer(call, svc, response, permit, int(gw.max_body_bytes))
    content_type = response.header("Content-Type")
    body = await enrich.finish(turn, response.status, content_type, body)
    await send_buffered(call, send, response.status, response.headers, body)
