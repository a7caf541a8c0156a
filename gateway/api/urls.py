from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from gateway.api import breakers, config, edge, routes, targets

urlpatterns: list[URLPattern | URLResolver] = [
    path("vx11/config", config.ConfigView.as_view(), name="config"),
    path("vx11/routes", routes.RouteListView.as_view(), name="routes"),
    path("vx11/routes/<str:intent>", routes.RouteDetailView.as_view(), name="route-detail"),
    path("vx11/rate-limit/status", edge.rate_limit_status, name="rate-limit-status"),
    path("shub/cache/clear", edge.shub_cache_clear, name="shub-cache-clear"),
    path("vx11/modules", breakers.ModuleListView.as_view(), name="modules"),
    path("vx11/modules/<str:module>", breakers.ModuleDetailView.as_view(), name="module-detail"),
    path(
        "vx11/modules/<str:module>/targets",
        targets.TargetListView.as_view(),
        name="module-targets",
    ),
    path(
        "vx11/modules/<str:module>/targets/<str:target>",
        targets.TargetDetailView.as_view(),
        name="module-target-detail",
    ),
    path(
        "vx11/circuit-breaker/status", breakers.BreakerStatusView.as_view(), name="breaker-status"
    ),
    path(
        "vx11/circuit-breaker/<str:module>",
        breakers.BreakerDetailView.as_view(),
        name="breaker-detail",
    ),
]
