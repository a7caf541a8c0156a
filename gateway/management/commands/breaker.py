"""``manage.py breaker status [MODULE]`` and ``manage.py breaker reset|open|close|auto MODULE``.

With Redis the command acts on the shared breaker state, which every gateway process and
host reads. Without Redis (the embedded default) each gateway process keeps its breakers in
its own memory; the command acts through the database instead: an action is written as a
``BreakerCommand`` row and announced with a configuration version bump, and every running
gateway process applies it within ``VX11_ROUTE_REFRESH_SECONDS`` (a second at most; see
``gateway.operations.registry``). ``status`` then reads the ``BreakerState`` rows the gateways write on
each transition (failure counts between transitions are not written there).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.config.snapshot import watches_database
from gateway.operations.breakers import breaker_statuses, force_breaker
from gateway.operations.configuration import module_table
from gateway.state import store

ACTIONS = {"reset": "reset", "open": "force_open", "close": "force_closed", "auto": "auto"}


def _time(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


class Command(BaseCommand):
    help = (
        "Show or change circuit breakers (in Redis, or through the database on the "
        "embedded default): status [MODULE] | reset|open|close|auto MODULE."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["status", *ACTIONS])
        parser.add_argument("module", nargs="?")

    def handle(self, *args: Any, **options: Any) -> None:
        action: str = options["action"]
        module: str | None = options["module"]
        # A command is not a gateway; only an in-memory database (tests) is one process.
        local = not watches_database()
        if action != "status" and not module:
            raise CommandError(f"breaker {action} needs a MODULE")
        table = module_table()
        if module is not None and module not in table:
            raise CommandError(f"unknown module {module!r}; known: {', '.join(sorted(table))}")
        if action == "status":
            names = [module] if module else sorted(table)
            statuses = breaker_statuses(table, names, local=local)
        else:
            assert module is not None
            status = force_breaker(module, ACTIONS[action], table, local=local)
            self.stdout.write(
                self.style.SUCCESS(f"{module}: {ACTIONS[action]} done, now {status.state}")
            )
            if not store.shared() and not local:
                self.stdout.write("Running gateways apply it within a second (no Redis).")
            statuses = {module: status}
        self.stdout.write(
            f"{'MODULE':<14} {'STATE':<10} {'FORCED':<7} {'FAILURES':>8} "
            f"{'LAST_FAILURE (UTC)':<20} {'OPENED_AT (UTC)':<20} {'RETRY_AFTER':>11}"
        )
        for name, s in statuses.items():
            self.stdout.write(
                f"{name:<14} {s.state:<10} {s.forced or '-':<7} {s.failure_count:>8} "
                f"{_time(s.last_failure):<20} {_time(s.opened_at):<20} {s.retry_after:>11.1f}"
            )
