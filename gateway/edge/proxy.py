"""The lean ASGI handler for proxied traffic: ``/vx11/route/{intent}`` and ``/shub/{path}``.

Mounted ahead of Django in ``vx11site.asgi`` because Django's ASGI handler
costs ≈1.7 ms CPU per request here (a thread per request for
``response.close``, see docs/PERFORMANCE.md). This handler reads the ASGI scope,
runs the shared pipeline (``gateway.edge.pipeline``) and streams the answer. Every
error becomes a problem+json answer through ``gateway.core.problems``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes

from gateway.config.modules import ModuleInfo
from gateway.config.routes import RouteConfig
from gateway.config.snapshot import Snapshot, holder
from gateway.config.validation import INTENT_RE
from gateway.core import correlation, metrics
from gateway.core.asgi import Message, Receive, Scope, Send, send_bytes
from gateway.core.conf import gw
from gateway.core.problems import (
    AuthRequired,
    Forbidden,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ShubUnavailable,
    UnknownIntent,
    UpstreamUnavailable,
)
from gateway.edge import auth, bodytimer
from gateway.edge.headers import (
    DROP_DOWNSTREAM,
    OWNED_PREFIXES,
    RequestHead,
    client_ip,
    edge,
    forwarded_proto,
    host_allowed,
    listed_names,
    sets_gateway_cookie,
    strip_gateway_cookies,
)

log = logging.getLogger("gateway.proxy")
INTENT_PREFIX = "/vx11/route/"
SHUB_PREFIX = "/shub"
SHUB_SLASH = "/shub/"
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_HIDDEN = frozenset({"", ".", ".."})  # what a segment's part before ';' must not be
_HEALTH_METHODS = frozenset({"GET", "HEAD"})
_BODYLESS = (204, 304)  # statuses that never carry Content-Length downstream


class ClientGone(Exception):
    """The client disconnected before the gateway finished reading its request."""


#: The status counted (metrics, access log) for a client that left before its answer was
#: complete, as nginx logs it: never a module failure, never an answer anyone received.
CLIENT_CLOSED = 499


@dataclass(slots=True)
class Call:
    """One proxied request as the pipeline sees it."""

    kind: str  # intent | shub
    method: str  # the method sent upstream
    upstream_path: str
    query: bytes
    scope: Scope
    correlation_id: str
    client_ip: str
    forwarded_for: str
    principal: auth.Principal
    module: ModuleInfo
    route: RouteConfig | None
    timeout: float
    priority: str
    protected: bool
    snapshot: Snapshot
    started: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    drop_authorization: bool = False
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    attempts: int = 0
    body_error: GatewayError | None = None
    body_complete: bool = False  # the whole request body has been received
    client_gone: bool = False
    upstream_seconds: float | None = None
    status: int = 0
    head: RequestHead | None = None  # the headers read in one pass (ProxyApp.__call__)
    forwarded_host: str = ""  # the validated Host
    forwarded_proto: str = "http"
    length: int | None = None  # the declared Content-Length, parsed once

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

    def upstream_headers(self) -> list[tuple[str, str]]:
        """The client's headers minus hop-by-hop and gateway credentials, plus ours.

        One pass: the gateway's session and CSRF cookies are taken out of ``Cookie``
        (several lines become one, as RFC 9113 §8.2.3 joins them for HTTP/1.1).
        """
        raw: list[tuple[bytes, bytes]] = self.scope["headers"]
        listed = self.head.listed() if self.head is not None else _NONE
        drop = edge().drop_upstream
        out: list[tuple[str, str]] = []
        traceparent = tracestate = None
        cookies: list[bytes] | None = None
        for name, value in raw:
            lname = name.lower()
            if lname in drop or lname in listed:
                if lname == b"traceparent":
                    traceparent = value.decode("latin-1")
                elif lname == b"tracestate":
                    tracestate = value.decode("latin-1")
                continue
            if lname == b"cookie":
                if cookies is None:
                    cookies = [value]
                else:
                    cookies.append(value)
                continue
            if lname == b"authorization" and self.drop_authorization:
                continue
            out.append((name.decode("latin-1"), value.decode("latin-1")))
        if cookies is not None:
            kept = strip_gateway_cookies(cookies)
            if kept is not None:
                out.append(("cookie", kept.decode("latin-1")))
        if correlation.valid_traceparent(traceparent):
            out.append(("traceparent", traceparent or ""))
            if correlation.valid_tracestate(tracestate):
                out.append(("tracestate", tracestate or ""))
        out += [
            ("X-Correlation-ID", self.correlation_id),
            ("X-Forwarded-For", self.forwarded_for),
            ("X-Forwarded-Proto", self.forwarded_proto),
            ("X-Forwarded-Host", self.forwarded_host),
            ("X-Forwarded-By", "vx11-gateway"),
        ]
        return out


_NONE: frozenset[bytes] = frozenset()


async def read_body(call: Call, receive: Receive, first: bytes = b"") -> AsyncIterator[bytes]:
    """Stream the request body (after ``first``, already received), enforcing
    ``VX11_MAX_BODY_BYTES`` and ``VX11_CLIENT_BODY_TIMEOUT`` as it arrives.

    The timeout runs only while waiting for the client: a body message with at least
    one byte restarts it; the time the consumer (an upstream that reads slowly) takes
    between two chunks is not the client's.
    """
    limit = int(gw.max_body_bytes)
    watch = bodytimer.waits()
    size = len(first)
    if first:
        yield first
    deadline = watch.deadline()
    while True:
        message = await _receive(call, receive, watch, deadline)
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            call.body_error = PayloadTooLarge(f"The request body exceeds {limit} bytes.")
            raise call.body_error
        if chunk:
            yield chunk
            deadline = watch.deadline()  # from now: the consumer's time is not the client's
        if not message.get("more_body", False):
            call.body_complete = True
            return


async def _receive(
    call: Call, receive: Receive, watch: bodytimer.BodyWaits, deadline: float
) -> Message:
    """One request-body message, waited for at most until ``deadline`` (408 after it);
    a disconnect raises ``ClientGone``."""
    task = asyncio.current_task()  # whichever task iterates: aiohttp's writer, or ours
    assert task is not None
    watch.waiting[task] = deadline
    if watch.handle is None:
        watch.arm()
    try:
        message = await receive()
    except asyncio.CancelledError:
        if watch.expired(task):
            raise _stalled(call) from None
        raise
    finally:
        watch.waiting.pop(task, None)
    if message["type"] == "http.disconnect":
        call.client_gone = True
        raise ClientGone()
    return message


def _stalled(call: Call) -> RequestTimeout:
    call.body_error = RequestTimeout(
        f"The request body made no progress for {float(gw.client_body_timeout):g} s."
    )
    return call.body_error


async def read_small(call: Call, receive: Receive) -> bytes | AsyncIterator[bytes]:
    """The body as bytes when it arrives in one message (the common small JSON case:
    cheaper to send than a stream), else a stream that starts with what was read."""
    watch = bodytimer.waits()
    first = await _receive(call, receive, watch, watch.deadline())
    chunk: bytes = first.get("body", b"")
    if len(chunk) > int(gw.max_body_bytes):
        call.body_error = PayloadTooLarge(f"The request body exceeds {gw.max_body_bytes} bytes.")
        raise call.body_error
    if not first.get("more_body", False):
        return chunk
    return read_body(call, receive, chunk)


async def read_all(call: Call, receive: Receive) -> bytes:
    parts = [chunk async for chunk in read_body(call, receive)]
    return b"".join(parts)


def parse_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidRequest("Content-Length is not a number.") from None
    if length < 0:
        raise InvalidRequest("Content-Length is negative.")
    return length


def check_shub_path(raw_path: str) -> str:
    """Refuse traversal, encoded separators and control characters, at every decoding level.

    Each level matters: a module (or a framework in front of it) may decode once more,
    so ``%252e%252e`` or ``%252f`` are as dangerous as ``..`` and ``%2f``. A path still
    changing after four decodings is refused outright.
    """
    forms = [raw_path]
    for _ in range(4):
        nxt = unquote(forms[-1])
        if nxt == forms[-1]:
            break
        forms.append(nxt)
    else:
        raise InvalidRequest("The path is percent-encoded too many times.")
    for form in forms:
        try:  # what a module would decode: overlong or invalid UTF-8 is refused
            if "%" in form:
                unquote_to_bytes(form).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("The path is not valid UTF-8 once percent-decoded.") from None
        if _CONTROL.search(form):
            raise InvalidRequest("The path contains control characters or backslashes.")
        segments = form.split("/")
        if (
            ".." in segments
            or "." in segments
            or "//" in form
            or (
                # Path parameters (``..;x=1``, ``.;``, ``;x``): Tomcat and Spring read the
                # segment before the ``;``, so they hide dot or empty segments.
                ";" in form
                and any(";" in seg and seg.split(";", 1)[0] in _HIDDEN for seg in segments)
            )
        ):
            raise InvalidRequest(
                "The path must not contain '.' or '..' segments or empty segments."
            )
        lowered = form.lower()
        if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
            raise InvalidRequest("The path must not contain encoded slashes, backslashes or NUL.")
    return raw_path


class ProxyApp:
    """ASGI application for the proxy paths (mounted by ``vx11site.asgi``)."""

    def __init__(self) -> None:
        from gateway.edge import pipeline

        self.pipeline = pipeline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = RequestHead(scope["headers"])
        cid = correlation.pick(head.correlation_id, head.request_id)
        token = correlation.current.set(cid)
        started = time.monotonic()
        sent = {"status": 0}
        call: Call | None = None

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = sent["status"] = message["status"]
                if status in _BODYLESS:
                    # RFC 9110 §8.6: a 204 never has Content-Length, a 304's describes the
                    # representation; the ASGI server would expect that many body bytes
                    # (uvicorn raises and resets the kept-alive client connection).
                    message["headers"] = [
                        (k, v)
                        for k, v in message.get("headers", ())
                        if k.lower() != b"content-length"
                    ]
            await send(message)

        try:
            call = await self.build_call(scope, cid, head)
            await self.pipeline.handle(call, receive, guarded_send)
        except GatewayError as raised:
            if call is not None and call.client_gone:
                log.info("client disconnected before sending its whole request")
                sent["status"] = CLIENT_CLOSED
                return
            exc = raised
            if call is not None and call.body_error is not None:
                exc = call.body_error
            if not sent["status"]:
                await self.send_problem(guarded_send, exc, cid, call)
            else:
                log.warning("upstream failed mid-answer", extra={"error": exc.code})
        except ClientGone:
            log.info("client disconnected before sending its whole request")
            sent["status"] = CLIENT_CLOSED
        except OSError:
            # The client went away while we were writing to it; the upstream
            # response was closed by the pipeline's finally blocks.
            log.info("client disconnected during the answer")
            sent["status"] = CLIENT_CLOSED
        except Exception:
            log.exception("unexpected error in the proxy")
            if not sent["status"]:
                await self.send_problem(guarded_send, InternalError(), cid, call)
        finally:
            record(scope, call, sent["status"], time.monotonic() - started)
            correlation.current.reset(token)

    async def send_problem(
        self, send: Send, exc: GatewayError, cid: str, call: Call | None
    ) -> None:
        status, headers, body = exc.render(cid)
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        raw.append((b"x-correlation-id", cid.encode()))
        if call is not None:
            if call.attempts:
                raw.append((b"x-vx11-attempts", str(call.attempts).encode()))
            raw.extend(call.response_headers)
        await send_bytes(send, status, raw, body)

    async def build_call(self, scope: Scope, cid: str, head: RequestHead) -> Call:
        host = self._host(scope, head)
        path: str = scope["path"]
        raw_path = scope.get("raw_path")
        snapshot = await holder.current()
        method = scope["method"]
        if path.startswith(INTENT_PREFIX):
            call = self._intent_call(scope, head, cid, snapshot, method, path)
        else:
            call = self._shub_call(
                scope, head, cid, snapshot, method, raw_path.decode("latin-1") if raw_path else path
            )
        call.forwarded_host = host
        return call

    @staticmethod
    def _host(scope: Scope, head: RequestHead) -> str:
        """The Host, checked against ``ALLOWED_HOSTS`` as Django's ``get_host`` checks it."""
        if head.hosts > 1:
            raise InvalidRequest("The request has more than one Host header.")
        host = head.host
        if host is None:  # HTTP/1.0 without Host: the server's address, as Django uses it
            server = scope.get("server") or ("", None)
            host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
        if not host_allowed(host):
            raise InvalidRequest("The Host header names a host this gateway does not serve.")
        return host

    def _intent_call(
        self, scope: Scope, head: RequestHead, cid: str, snapshot: Snapshot, method: str, path: str
    ) -> Call:
        intent = path[len(INTENT_PREFIX) :].rstrip("/")
        route = snapshot.routes.get(intent) if INTENT_RE.match(intent) else None
        if route is not None and not route.enabled:
            route = None
        principal = self._authenticate(
            head, snapshot, required=route is None or route.auth_required
        )
        if route is None:
            raise UnknownIntent(f"No route for intent {intent[:40]!r}.", intent=intent[:40])
        if method != "POST":
            raise MethodNotAllowed(["POST"])
        module = snapshot.modules.get(route.module)
        if module is None or not module.enabled:
            raise UpstreamUnavailable(
                f"Module {route.module!r} is not configured or disabled.", module=route.module
            )
        return self._call(
            scope,
            head,
            cid,
            snapshot,
            "intent",
            route.method,
            route.endpoint,
            principal,
            module,
            route,
            float(route.timeout),
            route.priority,
            route.protected,
        )

    def _shub_call(
        self,
        scope: Scope,
        head: RequestHead,
        cid: str,
        snapshot: Snapshot,
        method: str,
        raw_path: str,
    ) -> Call:
        raw_path = raw_path.split("?", 1)[0]
        if not (raw_path.startswith(SHUB_SLASH) or raw_path == SHUB_PREFIX):
            # The path only decodes to /shub (``/%73hub/x``): the prefix is strippable, the
            # public paths recognisable and the cache key comparable only in the raw form
            # every client sends, so a re-encoded prefix is refused, not guessed at.
            raise InvalidRequest("The /shub prefix must not be percent-encoded.")
        check_shub_path(raw_path)
        public = raw_path in gw.shub_public_paths
        principal = auth.ANONYMOUS
        if not public:
            # Protected /shub paths take the gateway token; the client token (if any)
            # still names the caller for rate limits.
            if gw.auth_enabled:
                ok = auth.check_gateway_token(head.gw_token)
                if ok is None:
                    raise AuthRequired(
                        "Send the gateway token in X-VX11-GW-Token.", realm="vx11-gateway"
                    )
                if not ok:
                    raise Forbidden("The gateway token is not valid.")
                principal = self._authenticate(head, snapshot, required=False)
                if not principal.authenticated:
                    principal = auth.Principal(
                        "gateway", "gw:" + _gw_id(head.gw_token), "gateway", False
                    )
            else:
                principal = auth.AUTH_DISABLED
        module = snapshot.modules.get("shub")
        if module is None or not module.enabled:
            raise ShubUnavailable("Module 'shub' is not configured or disabled.", module="shub")
        upstream_path = raw_path
        if gw.shub_strip_prefix:
            upstream_path = raw_path[len(SHUB_PREFIX) :] or "/"
        priority = (
            "health"
            if method in _HEALTH_METHODS and raw_path in ("/shub/health", "/shub/ready")
            else "other"
        )
        return self._call(
            scope,
            head,
            cid,
            snapshot,
            "shub",
            method,
            upstream_path,
            principal,
            module,
            None,
            float(gw.shub_timeout),
            priority,
            not public,
        )

    def _call(
        self,
        scope: Scope,
        head: RequestHead,
        cid: str,
        snapshot: Snapshot,
        kind: str,
        method: str,
        upstream_path: str,
        principal: auth.Principal,
        module: ModuleInfo,
        route: RouteConfig | None,
        timeout: float,
        priority: str,
        protected: bool,
    ) -> Call:
        peer = (scope.get("client") or ("127.0.0.1", 0))[0]
        trusted = tuple(gw.trusted_proxies)
        ip, forwarded = client_ip(peer, head.forwarded_for_list(), trusted)
        length = parse_length(head.content_length)
        if length is not None and length > int(gw.max_body_bytes):
            raise PayloadTooLarge(f"The request body exceeds {gw.max_body_bytes} bytes.")
        call = Call(
            kind,
            method,
            upstream_path,
            scope.get("query_string", b""),
            scope,
            cid,
            ip,
            forwarded,
            principal,
            module,
            route,
            timeout,
            priority,
            protected,
            snapshot,
        )
        call.deadline = call.started + timeout
        call.drop_authorization = self._authorization_is_gateway_credential(head, snapshot)
        call.head = head
        call.length = length
        call.forwarded_proto = forwarded_proto(
            str(scope.get("scheme", "http")), head.forwarded_proto, peer, trusted
        )
        return call

    def _authenticate(
        self, head: RequestHead, snapshot: Snapshot, *, required: bool
    ) -> auth.Principal:
        token = auth.client_token(head.token, head.authorization)
        if not gw.auth_enabled:
            return auth.AUTH_DISABLED
        if token is None:
            if required:
                raise AuthRequired()
            return auth.ANONYMOUS
        principal = auth.authenticate(token, snapshot)
        if principal is None:
            if required:
                raise Forbidden("The token is not valid.")
            return auth.ANONYMOUS
        return principal

    @staticmethod
    def _authorization_is_gateway_credential(head: RequestHead, snapshot: Snapshot) -> bool:
        token = auth.bearer(head.authorization)
        if token is None:
            return False
        if head.token is None:
            return True  # it was the channel the gateway read its credential from
        return auth.authenticate(token, snapshot) is not None


def record(scope: Scope, call: Call | None, status: int, seconds: float) -> None:
    """Metrics and the optional access log for one proxied request."""
    path: str = scope["path"]
    if path.startswith(SHUB_PREFIX):
        metrics.shub_request(path, scope["method"], status, seconds)
    else:
        intent = call.route.intent if call is not None and call.route is not None else "unknown"
        module = call.module.name if call is not None else "none"
        metrics.request(intent, module, status, call.upstream_seconds if call is not None else None)
    if gw.access_log or seconds > 1.0:
        log.info(
            "proxied request",
            extra={
                "method": scope["method"],
                "path": path[:200],
                "status": status,
                "seconds": round(seconds, 4),
                "attempts": call.attempts if call else 0,
                "client_ip": call.client_ip if call else None,
                "principal": call.principal.name if call else None,
            },
        )


def _gw_id(token: str | None) -> str:
    return hashlib.sha256((token or "").encode()).hexdigest()[:16]


def response_headers(
    call: Call,
    upstream_headers: list[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """Upstream headers minus hop-by-hop and the gateway's own, then the gateway's values.

    One test per header (a set, then a tuple of prefixes); ``Connection``-listed names
    and ``Set-Cookie`` for the gateway's session or CSRF cookie are the rare extra work.
    """
    out: list[tuple[bytes, bytes]] = []
    connection: list[bytes] | None = None
    for k, v in upstream_headers:
        lk = k.lower()
        if lk in DROP_DOWNSTREAM or lk.startswith(OWNED_PREFIXES):
            if lk == b"connection":
                connection = [v] if connection is None else [*connection, v]
            continue
        if lk == b"set-cookie" and sets_gateway_cookie(v):
            continue
        out.append((lk, v))
    if connection is not None:
        listed = listed_names(connection)
        out = [(k, v) for k, v in out if k not in listed]
    out.append((b"x-correlation-id", call.correlation_id.encode()))
    if call.route is not None:
        out.append((b"x-vx11-intent", call.route.intent.encode()))
    out.append((b"x-vx11-module", call.module.name.encode()))
    if call.attempts:
        out.append((b"x-vx11-attempts", str(call.attempts).encode()))
    out.extend(call.response_headers)
    return out
