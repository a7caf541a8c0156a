"""Configuration changes bump the configuration version once the transaction commits.

Saves and deletes (admin, API, commands, shells, ``loaddata``) come through these
receivers; bulk writes that send no signal (``update``, ``bulk_create``,
``bulk_update``) announce themselves in ``gateway.models.ConfigQuerySet``.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from gateway.models import ApiClient, Module, Route, announce_change


@receiver(post_save, sender=Module)
@receiver(post_save, sender=Route)
@receiver(post_save, sender=ApiClient)
@receiver(post_delete, sender=Module)
@receiver(post_delete, sender=Route)
@receiver(post_delete, sender=ApiClient)
def config_changed(sender: type, **kwargs: Any) -> None:
    transaction.on_commit(announce_change)


@receiver(post_save, sender=Route)
@receiver(post_delete, sender=Route)
def route_changed(sender: type, instance: Route, **kwargs: Any) -> None:
    """Tell live dashboards (``/ws/events``) once the change is committed."""
    from gateway import events

    action = "deleted" if kwargs.get("signal") is post_delete else "saved"
    event = {"type": "route.changed", "intent": instance.intent, "action": action}
    transaction.on_commit(lambda: events.emit(event))
