"""``manage.py import_config FILE [--dry-run] [--prune]`` (SPEC §21)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.operations.config_apply import import_text
from gateway.operations.config_doc import DocumentError


class Command(BaseCommand):
    help = (
        "Validate a configuration document (YAML or JSON; '-' reads stdin), print its "
        "changes and apply them in one transaction with one version bump. Invalid: every "
        "error is printed, nothing changes, exit 1."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="The document (from export_config), or '-' for stdin")
        parser.add_argument(
            "--dry-run", action="store_true", help="Validate and list the changes only"
        )
        parser.add_argument(
            "--prune",
            action="store_true",
            help="Delete rows of the listed sections that the file does not name",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["file"]
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot read {name}: {exc.strerror}.") from exc
        try:
            outcome = import_text(text, prune=options["prune"], dry_run=options["dry_run"])
        except DocumentError as exc:
            for error in exc.errors:
                self.stderr.write(error)
            raise CommandError(
                f"{len(exc.errors)} error(s) in {name}; nothing was changed."
            ) from exc
        for change in outcome.changes:
            self.stdout.write(str(change))
        if not outcome.changes:
            self.stdout.write("No changes.")
        elif options["dry_run"]:
            self.stdout.write(f"Dry run: {len(outcome.changes)} change(s), nothing written.")
        else:
            self.stdout.write(
                f"Applied {len(outcome.changes)} change(s); configuration version "
                f"{outcome.version}."
            )
        for client, token in outcome.tokens.items():
            self.stdout.write(f"Token of new client {client!r} (shown once, store it now):")
            self.stdout.write(token)
