from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from sessions_ctx7 import api

urlpatterns: list[URLPattern | URLResolver] = [
    path("vx11/context-7/sessions", api.SessionListView.as_view(), name="context7-sessions"),
    path(
        "vx11/context-7/sessions/<str:session_id>",
        api.SessionDetailView.as_view(),
        name="context7-session",
    ),
    path("vx11/context-7/cleanup", api.CleanupView.as_view(), name="context7-cleanup"),
]
