"""``manage.py purge_context7``: delete expired Context-7 sessions (cron-friendly)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from sessions_ctx7.services import clear_expired


class Command(BaseCommand):
    help = "Delete expired Context-7 sessions and their messages; print how many."

    def handle(self, *args: Any, **options: Any) -> None:
        removed = clear_expired()
        self.stdout.write(f"Removed {removed} expired Context-7 session(s).")
