from __future__ import annotations

from django.apps import AppConfig


class SessionsCtx7Config(AppConfig):
    name = "sessions_ctx7"
    verbose_name = "Context-7 sessions"
    default_auto_field = "django.db.models.BigAutoField"
