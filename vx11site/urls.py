from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import URLPattern, URLResolver, include, path

from gateway.api import docs
from gateway.console import traffic, views


async def home(request: HttpRequest) -> HttpResponseRedirect:
    """``GET /``: the live dashboard for staff, the API docs for everyone else."""
    user = await request.auser()
    staff = user.is_authenticated and user.is_active and user.is_staff
    return HttpResponseRedirect("/admin/dashboard/" if staff else "/docs")


urlpatterns: list[URLPattern | URLResolver] = [
    path("", home, name="home"),
    path("health", views.health, name="health"),
    path("ready", views.ready, name="ready"),
    path("metrics", views.metrics_view, name="metrics"),
    # Public and offline (SPEC §2, §15): see gateway/api/docs.py.
    path("openapi.json", docs.PublicSchemaView.as_view(), name="openapi"),
    path("docs", docs.PublicSwaggerView.as_view(), name="docs"),
    path("redoc", docs.PublicRedocView.as_view(), name="redoc"),
    path("redoc/redoc.standalone.js", docs.redoc_bundle, name="redoc-bundle"),
    path("vx11/traffic", traffic.traffic_view, name="traffic"),
    path("admin/", admin.site.urls),
    path("", include("gateway.api.urls")),
    path("", include("sessions_ctx7.urls")),
]

handler404 = "gateway.console.views.not_found"
handler500 = "gateway.console.views.server_error"
