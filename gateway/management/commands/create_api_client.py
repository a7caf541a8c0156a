from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.models import ApiClient


class Command(BaseCommand):
    help = (
        "Create an API client and print its token (shown once, stored only as a hash). "
        "The token is alone on the last line of output."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="A unique name for the client program")
        parser.add_argument(
            "--admin",
            action="store_true",
            help="Allow the management API (routes, modules, breakers)",
        )
        parser.add_argument(
            "--rate-limit",
            type=int,
            default=None,
            help="Requests per window for this client (default: VX11_RATE_LIMIT_TOKEN)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"].strip()
        if not name:
            raise CommandError("The client name must not be empty.")
        if ApiClient.objects.filter(name=name).exists():
            raise CommandError(f"An API client named {name!r} exists already.")
        client = ApiClient(name=name, is_admin=options["admin"], rate_limit=options["rate_limit"])
        token = client.set_new_token()
        client.save()
        kind = "admin client" if client.is_admin else "client"
        self.stdout.write(f"Created {kind} {name!r}. Its token is shown once; store it now:")
        self.stdout.write(token)
