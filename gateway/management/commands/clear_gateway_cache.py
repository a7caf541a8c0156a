"""``manage.py clear_gateway_cache``: what ``POST /shub/cache/clear`` does, from a shell."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from gateway.core.conf import gw
from gateway.core.problems import GatewayError
from gateway.operations.cache import clear_cache_sync


class Command(BaseCommand):
    help = (
        "Empty the gateway's shared response cache (/shub/health and /shub/ready answers) "
        "and print how many keys were deleted. Without VX11_REDIS_URL each gateway process "
        "keeps its own in-memory cache, which this command cannot reach: use "
        "POST /shub/cache/clear or the admin button instead."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            deleted = clear_cache_sync("command")
        except GatewayError as exc:
            raise CommandError(exc.detail) from None
        if not gw.redis_url:
            self.stderr.write(
                "No VX11_REDIS_URL: only this command's own (empty) in-process cache was "
                "cleared; running gateways keep theirs."
            )
        self.stdout.write(f"Cleared the gateway cache: {deleted} key(s) deleted.")
