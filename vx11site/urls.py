from __future__ import annotations

from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path

from gateway.api import docs
from gateway.console import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("health", views.health, name="health"),
    path("ready", views.ready, name="ready"),
    path("metrics", views.metrics_view, name="metrics"),
    # Public and offline (SPEC §2, §15): see gateway/api/docs.py.
    path("openapi.json", docs.PublicSchemaView.as_view(), name="openapi"),
    path("docs", docs.PublicSwaggerView.as_view(), name="docs"),
    path("redoc", docs.PublicRedocView.as_view(), name="redoc"),
    path("redoc/redoc.standalone.js", docs.redoc_bundle, name="redoc-bundle"),
    path("admin/", admin.site.urls),
    path("", include("gateway.api.urls")),
    path("", include("sessions_ctx7.urls")),
]

handler404 = "gateway.console.views.not_found"
handler500 = "gateway.console.views.server_error"
