"""Configuration changes bump the configuration version in the writing transaction.

Saves and deletes (admin, API, commands, shells, ``loaddata``) come through these
receivers, inside the transaction of the write (``gateway.models.ConfigModel`` runs a
save or delete in one, ``loaddata`` runs in one); bulk writes that send no signal
(``update``, ``bulk_create``, ``bulk_update``) announce themselves in
``gateway.models.ConfigQuerySet``. Several writes in one transaction bump it once.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from gateway.models import ApiClient, Module, Route, Target, announce_change
from gateway.operations import events


@receiver(post_save, sender=Module)
@receiver(post_save, sender=Route)
@receiver(post_save, sender=ApiClient)
@receiver(post_save, sender=Target)
@receiver(post_delete, sender=Module)
@receiver(post_delete, sender=Target)
@receiver(post_delete, sender=Route)
@receiver(post_delete, sender=ApiClient)
def config_changed(sender: type, using: str | None = None, **kwargs: Any) -> None:
    announce_change(using)  # the ConfigVersion row now; the rest once committed


@receiver(post_save, sender=Route)
@receiver(post_delete, sender=Route)
def route_changed(sender: type, instance: Route, **kwargs: Any) -> None:
    """Tell live dashboards (``/ws/events``) once the change is committed."""
    action = "deleted" if kwargs.get("signal") is post_delete else "saved"
    event = {"type": "route.changed", "intent": instance.intent, "action": action}
    transaction.on_commit(lambda: events.emit(event))
