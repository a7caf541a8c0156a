from __future__ import annotations

from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "VX11 Gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks and the signal receivers.
        from gateway import checks, signals  # noqa: F401  # deferred: Django app registry

        # Registers the OpenAPI auth extension.
        from gateway.api import schema  # noqa: F401  # deferred: Django app registry
