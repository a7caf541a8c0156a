"""``manage.py breaker status [MODULE]`` and ``manage.py breaker reset|open|close|auto MODULE``.

The command acts on the shared breaker state in Redis, which every gateway process and
host reads. Without Redis each gateway process keeps its breakers in its own memory,
out of reach of another process: then use the API (``POST /vx11/circuit-breaker/{module}``)
or the admin's Modules page instead.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway import store

ACTIONS = {"reset": "reset", "open": "force_open", "close": "force_closed", "auto": "auto"}
NO_STORE = (
    "No shared store: VX11_REDIS_URL is not set, so breaker state lives inside each "
    "running gateway process and this command cannot reach it (it acts only on the shared "
    "Redis state). Use the API instead — GET /vx11/circuit-breaker/status, "
    'POST /vx11/circuit-breaker/<module> {"action": "reset"|"force_open"|"force_closed"|'
    '"auto"} with an admin token — or the admin: Gateway › Modules › actions.'
)


def _time(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


class Command(BaseCommand):
    help = (
        "Show or change circuit breakers in the shared (Redis) state: "
        "status [MODULE] | reset|open|close|auto MODULE."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["status", *ACTIONS])
        parser.add_argument("module", nargs="?")

    def handle(self, *args: Any, **options: Any) -> None:
        from gateway.api.breakers import breaker_statuses, force_breaker, module_table

        action: str = options["action"]
        module: str | None = options["module"]
        if not store.shared():
            raise CommandError(NO_STORE)
        if action != "status" and not module:
            raise CommandError(f"breaker {action} needs a MODULE")
        table = module_table()
        if module is not None and module not in table:
            raise CommandError(f"unknown module {module!r}; known: {', '.join(sorted(table))}")
        if action == "status":
            names = [module] if module else sorted(table)
            statuses = breaker_statuses(table, names)
        else:
            assert module is not None
            status = force_breaker(module, ACTIONS[action], table)
            self.stdout.write(
                self.style.SUCCESS(f"{module}: {ACTIONS[action]} done, now {status.state}")
            )
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
