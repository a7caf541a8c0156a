"""``manage.py revoke_api_client NAME``: the client's token is refused everywhere.

The save announces a configuration change (``gateway.signals``): every running gateway,
on the embedded default too, refuses the token within a second (SPEC §0, §2).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from gateway.models import ApiClient


class Command(BaseCommand):
    help = "Revoke an API client: its token is refused from now on (the row is kept)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The client's name")

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"].strip()
        client = ApiClient.objects.filter(name=name).first()
        if client is None:
            raise CommandError(f"No API client named {name!r}.")
        if not client.active:
            self.stdout.write(f"API client {name!r} was already revoked.")
            return
        client.active = False
        client.revoked_at = timezone.now()
        client.save(update_fields=["active", "revoked_at", "updated_at"])
        self.stdout.write(self.style.SUCCESS(f"Revoked API client {name!r}."))
