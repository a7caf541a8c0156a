from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from gateway.api import routes

urlpatterns: list[URLPattern | URLResolver] = [
    path("vx11/routes", routes.RouteListView.as_view(), name="routes"),
    path("vx11/routes/<str:intent>", routes.RouteDetailView.as_view(), name="route-detail"),
]
