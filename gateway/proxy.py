"""The lean ASGI handler for proxied traffic: ``/vx11/route/{intent}`` and ``/shub/{path}``.

Mounted ahead of Django in ``vx11site.asgi`` because Django's ASGI handler
costs ≈1.7 ms CPU per request here (a thread per request for
``response.close``, see docs/PERFORMANCE.md). This handler reads the ASGI scope,
runs the shared pipeline (``gateway.pipeline``) and streams the answer. Every
error becomes a problem+json answer through ``gateway.problems``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes

from gateway import auth, correlation, metrics
from gateway.asgi_util import Message, Receive, Scope, Send, send_bytes
from gateway.conf import gw
from gateway.headers import DROP_DOWNSTREAM, DROP_UPSTREAM, client_ip, connection_listed
from gateway.modules import ModuleInfo
from gateway.problems import (
    AuthRequired,
    Forbidden,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    ShubUnavailable,
    UnknownIntent,
    UpstreamUnavailable,
)
from gateway.routes import RouteConfig
from gateway.snapshot import Snapshot, holder
from gateway.validation import INTENT_RE

log = logging.getLogger("gateway.proxy")
INTENT_PREFIX = "/vx11/route/"
SHUB_PREFIX = "/shub"
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


class ClientGone(Exception):
    """The client disconnected before the gateway finished reading its request."""


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
        """The client's headers minus hop-by-hop and gateway credentials, plus ours."""
        raw: list[tuple[bytes, bytes]] = self.scope["headers"]
        listed = connection_listed(raw)
        out: list[tuple[str, str]] = []
        traceparent = tracestate = None
        for name, value in raw:
            lname = name.lower()
            if lname == b"traceparent":
                traceparent = value.decode("latin-1")
            elif lname == b"tracestate":
                tracestate = value.decode("latin-1")
            if lname in DROP_UPSTREAM or lname in listed:
                continue
            if lname == b"authorization" and self.drop_authorization:
                continue
            out.append((name.decode("latin-1"), value.decode("latin-1")))
        if correlation.valid_traceparent(traceparent):
            out.append(("traceparent", traceparent or ""))
            if correlation.valid_tracestate(tracestate):
                out.append(("tracestate", tracestate or ""))
        host = _first(raw, b"host") or ""
        out += [
            ("X-Correlation-ID", self.correlation_id),
            ("X-Forwarded-For", self.forwarded_for),
            ("X-Forwarded-Proto", str(self.scope.get("scheme", "http"))),
            ("X-Forwarded-Host", host),
            ("X-Forwarded-By", "vx11-gateway"),
        ]
        return out


def _first(raw: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in raw:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(call: Call, receive: Receive) -> AsyncIterator[bytes]:
    """Stream the request body, enforcing ``VX11_MAX_BODY_BYTES`` as it arrives."""
    limit = int(gw.max_body_bytes)
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            call.client_gone = True
            raise ClientGone()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            call.body_error = PayloadTooLarge(f"The request body exceeds {limit} bytes.")
            raise call.body_error
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            call.body_complete = True
            return


async def read_small(call: Call, receive: Receive) -> bytes | AsyncIterator[bytes]:
    """The body as bytes when it arrives in one message (the common small JSON case:
    cheaper to send than a stream), else a stream that starts with what was read."""
    first = await receive()
    if first["type"] == "http.disconnect":
        call.client_gone = True
        raise ClientGone()
    chunk: bytes = first.get("body", b"")
    if len(chunk) > int(gw.max_body_bytes):
        call.body_error = PayloadTooLarge(f"The request body exceeds {gw.max_body_bytes} bytes.")
        raise call.body_error
    if not first.get("more_body", False):
        return chunk
    return _chain(chunk, call, receive)


async def _chain(first: bytes, call: Call, receive: Receive) -> AsyncIterator[bytes]:
    limit = int(gw.max_body_bytes)
    size = len(first)
    yield first
    async for chunk in read_body(call, receive):
        size += len(chunk)
        if size > limit:
            call.body_error = PayloadTooLarge(f"The request body exceeds {limit} bytes.")
            raise call.body_error
        yield chunk


async def read_all(call: Call, receive: Receive) -> bytes:
    parts = [chunk async for chunk in read_body(call, receive)]
    return b"".join(parts)


def declared_length(scope: Scope) -> int | None:
    value = _first(scope["headers"], b"content-length")
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
        if ".." in form.split("/") or "." in form.split("/") or "//" in form:
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
        from gateway import pipeline

        self.pipeline = pipeline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope["headers"]
        cid = correlation.pick(
            _first(headers, b"x-correlation-id"), _first(headers, b"x-request-id")
        )
        token = correlation.current.set(cid)
        started = time.monotonic()
        sent = {"status": 0}
        call: Call | None = None

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            call = await self.build_call(scope, cid)
            await self.pipeline.handle(call, receive, guarded_send)
        except GatewayError as raised:
            if call is not None and call.client_gone:
                log.info("client disconnected before sending its whole request")
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
        except OSError:
            # The client went away while we were writing to it; the upstream
            # response was closed by the pipeline's finally blocks.
            log.info("client disconnected during the answer")
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

    async def build_call(self, scope: Scope, cid: str) -> Call:
        path: str = scope["path"]
        raw_path = scope.get("raw_path")
        snapshot = await holder.current()
        method = scope["method"]
        if path.startswith(INTENT_PREFIX):
            return self._intent_call(scope, cid, snapshot, method, path)
        return self._shub_call(
            scope, cid, snapshot, method, raw_path.decode("latin-1") if raw_path else path
        )

    def _intent_call(
        self, scope: Scope, cid: str, snapshot: Snapshot, method: str, path: str
    ) -> Call:
        intent = path[len(INTENT_PREFIX) :].rstrip("/")
        route = snapshot.routes.get(intent) if INTENT_RE.match(intent) else None
        if route is not None and not route.enabled:
            route = None
        principal = self._authenticate(
            scope, snapshot, required=route is None or route.auth_required
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
        self, scope: Scope, cid: str, snapshot: Snapshot, method: str, raw_path: str
    ) -> Call:
        raw_path = raw_path.split("?", 1)[0]
        check_shub_path(raw_path)
        public = raw_path in gw.shub_public_paths
        principal = auth.ANONYMOUS
        if not public:
            # Protected /shub paths take the gateway token; the client token (if any)
            # still names the caller for rate limits.
            if gw.auth_enabled:
                ok = auth.check_gateway_token(_first(scope["headers"], b"x-vx11-gw-token"))
                if ok is None:
                    raise AuthRequired(
                        "Send the gateway token in X-VX11-GW-Token.", realm="vx11-gateway"
                    )
                if not ok:
                    raise Forbidden("The gateway token is not valid.")
                principal = self._authenticate(scope, snapshot, required=False)
                if not principal.authenticated:
                    principal = auth.Principal("gateway", "gw:" + _gw_id(scope), "gateway", False)
            else:
                principal = auth.AUTH_DISABLED
        module = snapshot.modules.get("shub")
        if module is None or not module.enabled:
            raise ShubUnavailable("Module 'shub' is not configured or disabled.", module="shub")
        upstream_path = raw_path
        if gw.shub_strip_prefix:
            upstream_path = raw_path[len(SHUB_PREFIX) :] or "/"
        priority = "health" if raw_path in ("/shub/health", "/shub/ready") else "other"
        return self._call(
            scope,
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
        ip, forwarded = client_ip(
            peer, _first(scope["headers"], b"x-forwarded-for"), list(gw.trusted_proxies)
        )
        length = declared_length(scope)
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
        call.drop_authorization = self._authorization_is_gateway_credential(scope, snapshot)
        return call

    def _authenticate(self, scope: Scope, snapshot: Snapshot, *, required: bool) -> auth.Principal:
        headers = scope["headers"]
        token = auth.client_token(
            _first(headers, b"x-vx11-token"), _first(headers, b"authorization")
        )
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
    def _authorization_is_gateway_credential(scope: Scope, snapshot: Snapshot) -> bool:
        headers = scope["headers"]
        token = auth.bearer(_first(headers, b"authorization"))
        if token is None:
            return False
        if _first(headers, b"x-vx11-token") is None:
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


def _gw_id(scope: Scope) -> str:
    import hashlib

    token = _first(scope["headers"], b"x-vx11-gw-token") or ""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def response_headers(
    call: Call,
    upstream_headers: list[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """Upstream headers minus hop-by-hop, plus the gateway's own."""
    listed = connection_listed(upstream_headers)
    out = [
        (k.lower(), v)
        for k, v in upstream_headers
        if k.lower() not in DROP_DOWNSTREAM and k.lower() not in listed
    ]
    out.append((b"x-correlation-id", call.correlation_id.encode()))
    if call.route is not None:
        out.append((b"x-vx11-intent", call.route.intent.encode()))
    out.append((b"x-vx11-module", call.module.name.encode()))
    if call.attempts:
        out.append((b"x-vx11-attempts", str(call.attempts).encode()))
    out.extend(call.response_headers)
    return out
