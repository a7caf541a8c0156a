"""The request pipeline shared by every proxied call.

    router (auth) → rate limit → [cache | Context-7] → backpressure
        → (breaker → upstream seam) × attempts → answer

Each step is a plain async function over a :class:`~gateway.edge.call.Call`; the
policies themselves live in ``gateway.policies`` and are reached through
:mod:`gateway.operations.registry`. The upstream step (slot, breaker, retries, the seam)
is :mod:`gateway.edge.exchange`; reading and writing the answer, and recording the
attempt's breaker outcome once its body is known, is :mod:`gateway.edge.answer`. Errors
are raised as ``gateway.core.problems`` exceptions and rendered in one place
(``gateway.edge.proxy.ProxyApp``).
"""

from __future__ import annotations

import time

from gateway.core import metrics
from gateway.core.asgi import Receive, Send
from gateway.core.conf import gw
from gateway.core.problems import TooManyRequests
from gateway.edge import fallback, tracing
from gateway.edge.answer import read_answer, send_buffered, stream_response
from gateway.edge.body import read_all, read_small
from gateway.edge.call import HEALTH_PATHS, Call
from gateway.edge.exchange import forward, retryable, slot
from gateway.edge.fallback import has_fallbacks
from gateway.operations import registry as services
from gateway.policies.breaker import Permit
from gateway.policies.ratelimit import ratelimit_headers
from gateway.policies.respcache import CachedResponse
from gateway.policies.scopes import build_scopes
from gateway.upstream import Body
from sessions_ctx7 import enrich

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
    length = call.request.length
    return length is not None and length <= REPLAY_LIMIT


def has_body(call: Call) -> bool:
    request = call.request
    length = request.length
    if length is not None:
        return length > 0
    return request.chunked


async def handle(call: Call, receive: Receive, send: Send) -> None:
    svc = services.get()
    if tracing.enabled:
        tracing.annotate(call)
    if (
        call.kind == "shub"
        and call.method == "GET"
        and gw.cache_enabled
        and call.upstream_path_key in HEALTH_PATHS  # GET answers shared for VX11_CACHE_TTL_HEALTH s
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
    chain = has_fallbacks(call)
    if (
        body is not None
        and not isinstance(body, bytes)
        and (chain or retryable(call))
        and replay_fits(call)
    ):
        body = b"".join([chunk async for chunk in body])  # replayable, at most REPLAY_LIMIT
    if body is None or isinstance(body, bytes):
        call.body_complete = True
    if chain:  # SPEC §19: the module, then each fallback (gateway/edge/fallback.py)
        await fallback.serve(call, body, svc, permit, send, receive)
        return
    async with slot(call, svc):
        response, permit = await forward(call, body, svc, permit)
        await stream_response(call, response, send, receive, svc, permit)


# --------------------------------------------------------------------------- rate limits


async def rate_limit(
    call: Call, svc: services.Services, *, upstream_next: bool = False
) -> Permit | None:
    """Token, IP and protected scopes (``gateway.policies.scopes``), decided in one store
    round trip.

    With ``upstream_next`` the same round trip may also answer the module's breaker for
    the first attempt: that permit is returned (``None``: ``forward`` acquires one).
    """
    if not gw.rate_limit_enabled:
        return None
    scopes = build_scopes(call.principal, call.request.client_ip, call.protected)
    admitted = await svc.admission.admit(scopes, call.module.name if upstream_next else None)
    decision = admitted.decision
    headers = ratelimit_headers(decision)
    if decision.would_refuse and decision.refused_by is not None:
        metrics.rate_limited(decision.refused_by.name)
    if not decision.allowed:
        scope = decision.refused_by.name if decision.refused_by else "token"
        if tracing.enabled:
            tracing.event("vx11.rate_limited", scope=scope, retry_after=decision.retry_after)
        raise TooManyRequests(scope, decision.retry_after, headers)
    call.response_headers.extend(
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers
    )
    return admitted.permit


# --------------------------------------------------------------------------- health cache


async def serve_cached(call: Call, svc: services.Services, send: Send) -> None:
    """GET /shub/health and /shub/ready: 2xx answers shared for VX11_CACHE_TTL_HEALTH s."""
    ttl = gw.cache_ttl_health
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
    raw = await read_all(call, receive)
    budget = call.deadline - time.monotonic()  # a warm turn must not outlast its session
    turn = await enrich.begin(call.principal.id, raw, call.request.session, budget=budget)
    call.response_headers.append((b"x-vx11-session", turn.session_id.encode()))
    call.session_key = turn.session_id  # lb=session keeps a conversation on one target
    try:
        if has_fallbacks(call):  # the enriched body goes to every option (SPEC §19)
            answer = await fallback.fetch(call, turn.body, svc, gw.max_body_bytes)
            status, headers, body = answer.status, answer.headers, answer.body
            content_type = answer.header("Content-Type")
        else:
            async with slot(call, svc):
                response, permit = await forward(call, turn.body, svc)
                body = await read_answer(call, svc, response, permit, gw.max_body_bytes)
            status, headers = response.status, response.headers
            content_type = response.header("Content-Type")
    except BaseException:  # no answer (an error, a timeout, the client left)
        await enrich.settle(turn)  # the user's message is stored all the same
        raise
    body = await enrich.finish(turn, status, content_type, body)
    await send_buffered(call, send, status, headers, body)


__all__ = [
    "forward",
    "handle",
    "rate_limit",
    "serve_cached",
    "serve_context7",
    "slot",
]
