"""The API documentation pages: ``/openapi.json``, ``/docs`` (Swagger UI), ``/redoc``.

Public (SPEC §2): no authentication class runs on them, so a wrong or malformed token
sent along is ignored rather than answered 403. Offline (SPEC §15): every asset comes
from the gateway. drf-spectacular-sidecar ships the bundles; two things still reached
the internet and are removed here:

- drf-spectacular's ``redoc.html`` links Google Fonts (overridden in
  ``templates/drf_spectacular/redoc.html``);
- the ReDoc bundle shows a "powered by" logo loaded from ``cdn.redoc.ly`` whatever its
  options say. The bundle is served by :func:`redoc_bundle` with that URL replaced by
  an inline image, read once from the sidecar's file.

A ``Content-Security-Policy`` that allows only the gateway's own origin (plus inline
styles, ``data:`` images and ``blob:`` workers, which both UIs build at run time) makes a
browser refuse anything else should a future bundle try.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from django.contrib.staticfiles import finders
from django.http import HttpRequest, HttpResponse, HttpResponseNotModified
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import (
    SpectacularJSONAPIView,
    SpectacularRedocView,
    SpectacularSwaggerSplitView,
)
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from gateway.console.middleware import problem_response
from gateway.core import correlation
from gateway.core.problems import MethodNotAllowed

REDOC_BUNDLE = "drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js"
#: Fetched by the bundle at run time for its "API docs by Redocly" footer.
REDOC_LOGO_URL = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
#: A neutral mark in its place (an inline image: no request at all).
INLINE_LOGO = (
    b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E"
    b"%3Ccircle cx='8' cy='8' r='6' fill='%2332329f'/%3E%3C/svg%3E"
)
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    ]
)
#: Swagger UI's own options: no call to validator.swagger.io for its badge.
SWAGGER_UI_SETTINGS = '{"validatorUrl": null, "deepLinking": true}'


def _offline(response: Response) -> Response:
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


class PublicSchemaView(SpectacularJSONAPIView):
    """``/openapi.json``: the whole schema for anyone, whatever credentials are sent."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]


class PublicSwaggerView(SpectacularSwaggerSplitView):
    """``/docs``: Swagger UI, its start-up script served from the same URL (``?script``)
    so the page needs no inline script."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    url_name = "openapi"

    @extend_schema(exclude=True)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        response = super().get(request, *args, **kwargs)  # type: ignore[no-untyped-call]
        if "settings" in response.data:
            response.data["settings"] = SWAGGER_UI_SETTINGS
        return _offline(response)


class PublicRedocView(SpectacularRedocView):
    """``/redoc``: ReDoc with the gateway's copy of its bundle."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    url_name = "openapi"

    @extend_schema(exclude=True)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        response = super().get(request, *args, **kwargs)  # type: ignore[no-untyped-call]
        response.data["redoc_standalone"] = reverse("redoc-bundle")
        return _offline(response)


@functools.cache
def _bundle() -> tuple[bytes, str]:
    """The sidecar's ReDoc bundle with its one external fetch made inline; its ETag."""
    found = finders.find(REDOC_BUNDLE)
    if not isinstance(found, str):
        raise FileNotFoundError(REDOC_BUNDLE)
    body = Path(found).read_bytes().replace(REDOC_LOGO_URL, INLINE_LOGO)
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@csrf_exempt  # read-only; other methods answer a 405 problem, not Django's CSRF page
def redoc_bundle(request: HttpRequest) -> HttpResponse:
    """``GET /redoc/redoc.standalone.js``."""
    if request.method not in ("GET", "HEAD"):
        return problem_response(MethodNotAllowed(["GET", "HEAD"]), correlation.current.get())
    body, etag = _bundle()
    if request.headers.get("If-None-Match") == etag:
        response: HttpResponse = HttpResponseNotModified()
    else:
        response = HttpResponse(body, content_type="application/javascript; charset=utf-8")
    response["ETag"] = etag
    response["Cache-Control"] = "public, max-age=86400"
    return response
