"""Configuration changes bump the shared snapshot version once the transaction commits."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from gateway.models import ApiClient, Module, Route
from gateway.snapshot import bump_version


@receiver(post_save, sender=Module)
@receiver(post_save, sender=Route)
@receiver(post_save, sender=ApiClient)
@receiver(post_delete, sender=Module)
@receiver(post_delete, sender=Route)
@receiver(post_delete, sender=ApiClient)
def config_changed(sender: type, **kwargs: Any) -> None:
    transaction.on_commit(bump_version)


@receiver(post_save, sender=Route)
@receiver(post_delete, sender=Route)
def route_changed(sender: type, instance: Route, **kwargs: Any) -> None:
    """Tell live dashboards (``/ws/events``) once the change is committed."""
    from gateway import events

    action = "deleted" if kwargs.get("signal") is post_delete else "saved"
    event = {"type": "route.changed", "intent": instance.intent, "action": action}
    transaction.on_commit(lambda: events.emit(event))
