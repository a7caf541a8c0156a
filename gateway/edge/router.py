"""Where a request goes and who sends it: a :class:`Request` becomes a :class:`Call`.

``/vx11/route/{intent}`` resolves the intent to its route and module; ``/shub/{path}`` is
checked (traversal, encodings) and goes to the ``shub`` module. Both authenticate the
caller (``gateway.edge.auth``) in the order in which the refusals are answered: the Host,
then the route (404/401/403/405/503), then the body's declared length.
"""

from __future__ import annotations

import re
import time
from urllib.parse import unquote, unquote_to_bytes

from gateway.config.modules import ModuleInfo
from gateway.config.routes import RouteConfig
from gateway.config.snapshot import Snapshot, holder
from gateway.config.validation import INTENT_RE
from gateway.core.conf import gw
from gateway.core.problems import (
    AuthRequired,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    ShubUnavailable,
    UnknownIntent,
    UpstreamUnavailable,
)
from gateway.core.tokens import hash_token
from gateway.edge import auth
from gateway.edge.call import HEALTH_PATHS, SHUB_PREFIX, Call
from gateway.edge.request import Request

INTENT_PREFIX = "/vx11/route/"
SHUB_SLASH = "/shub/"
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_HIDDEN = frozenset({"", ".", ".."})  # what a segment's part before ';' must not be
_HEALTH_METHODS = frozenset({"GET", "HEAD"})


async def build(request: Request) -> Call:
    """The call for ``request`` (refusals raised as problems, in the order answered)."""
    request.check_host()
    return route(request, await holder.current())


def route(request: Request, snapshot: Snapshot) -> Call:
    """The call for ``request``, its Host checked, under the configuration ``snapshot``."""
    path = request.path
    if path.startswith(INTENT_PREFIX):
        return _intent_call(request, snapshot, path)
    raw_path = request.raw_path
    return _shub_call(request, snapshot, raw_path.decode("latin-1") if raw_path else path)


def _intent_call(request: Request, snapshot: Snapshot, path: str) -> Call:
    intent = path[len(INTENT_PREFIX) :].rstrip("/")
    found = snapshot.routes.get(intent) if INTENT_RE.match(intent) else None
    if found is not None and not found.enabled:
        found = None
    principal = authenticate(request, snapshot, required=found is None or found.auth_required)
    if found is None:
        raise UnknownIntent(f"No route for intent {intent[:40]!r}.", intent=intent[:40])
    if request.method != "POST":
        raise MethodNotAllowed(["POST"])
    module = snapshot.modules.get(found.module)
    if module is None or not module.enabled:
        raise UpstreamUnavailable(
            f"Module {found.module!r} is not configured or disabled.", module=found.module
        )
    return _call(
        request,
        snapshot,
        "intent",
        found.method,
        found.endpoint,
        principal,
        module,
        found,
        float(found.timeout),
        found.priority,
        found.protected,
    )


def _shub_call(request: Request, snapshot: Snapshot, raw_path: str) -> Call:
    raw_path = raw_path.split("?", 1)[0]
    if not (raw_path.startswith(SHUB_SLASH) or raw_path == SHUB_PREFIX):
        # The path only decodes to /shub (``/%73hub/x``): the prefix is strippable, the
        # public paths recognisable and the cache key comparable only in the raw form
        # every client sends, so a re-encoded prefix is refused, not guessed at.
        raise InvalidRequest("The /shub prefix must not be percent-encoded.")
    check_shub_path(raw_path)
    public = raw_path in gw.shub_public_paths
    principal = auth.ANONYMOUS if public else _shub_principal(request, snapshot)
    module = snapshot.modules.get("shub")
    if module is None or not module.enabled:
        raise ShubUnavailable("Module 'shub' is not configured or disabled.", module="shub")
    upstream_path = raw_path
    if gw.shub_strip_prefix:
        upstream_path = raw_path[len(SHUB_PREFIX) :] or "/"
    method = request.method
    health = method in _HEALTH_METHODS and raw_path in HEALTH_PATHS
    return _call(
        request,
        snapshot,
        "shub",
        method,
        upstream_path,
        principal,
        module,
        None,
        gw.shub_timeout,
        "health" if health else "other",
        not public,
    )


def _shub_principal(request: Request, snapshot: Snapshot) -> auth.Principal:
    """Protected /shub paths take the gateway token; the client token (if any) still names
    the caller for rate limits."""
    if not gw.auth_enabled:
        return auth.AUTH_DISABLED
    ok = auth.check_gateway_token(request.gw_token)
    if ok is None:
        raise AuthRequired("Send the gateway token in X-VX11-GW-Token.", realm="vx11-gateway")
    if not ok:
        raise Forbidden("The gateway token is not valid.")
    principal = authenticate(request, snapshot, required=False)
    if principal.authenticated:
        return principal
    gateway_id = "gw:" + hash_token(request.gw_token or "")[:16]
    return auth.Principal("gateway", gateway_id, "gateway", False)


def _call(
    request: Request,
    snapshot: Snapshot,
    kind: str,
    method: str,
    upstream_path: str,
    principal: auth.Principal,
    module: ModuleInfo,
    found: RouteConfig | None,
    timeout: float,
    priority: str,
    protected: bool,
) -> Call:
    request.admit()
    return Call(
        request,
        kind,
        method,
        upstream_path,
        principal,
        module,
        found,
        priority,
        protected,
        snapshot,
        time.monotonic() + timeout,
        _authorization_is_gateway_credential(request, snapshot),
        request.query,
    )


def authenticate(request: Request, snapshot: Snapshot, *, required: bool) -> auth.Principal:
    """The caller named by the client token (``X-VX11-Token``, else ``Authorization``)."""
    token = auth.client_token(request.token, request.authorization)
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


def _authorization_is_gateway_credential(request: Request, snapshot: Snapshot) -> bool:
    token = auth.bearer(request.authorization)
    if token is None:
        return False
    if request.token is None:
        return True  # it was the channel the gateway read its credential from
    return auth.authenticate(token, snapshot) is not None


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
        _check_form(form)
    return raw_path


def _check_form(form: str) -> None:
    """One decoding level of a /shub path (``check_shub_path``)."""
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
            ";" in form and any(";" in seg and seg.split(";", 1)[0] in _HIDDEN for seg in segments)
        )
    ):
        raise InvalidRequest("The path must not contain '.' or '..' segments or empty segments.")
    lowered = form.lower()
    if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
        raise InvalidRequest("The path must not contain encoded slashes, backslashes or NUL.")
