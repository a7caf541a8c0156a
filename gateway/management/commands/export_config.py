"""``manage.py export_config [--output FILE] [--format yaml|json]`` (SPEC §21)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from gateway.operations.config_doc import build_document, dump


class Command(BaseCommand):
    help = (
        "Write the managed configuration (modules, route overrides, API clients without "
        "tokens) as one YAML document, to standard output or --output FILE."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--output", "-o", help="Write to this file instead of stdout")
        parser.add_argument("--format", choices=("yaml", "json"), default="yaml")

    def handle(self, *args: Any, **options: Any) -> None:
        text = dump(build_document(), options["format"])
        if options["output"]:
            Path(options["output"]).write_text(text, encoding="utf-8")
            self.stderr.write(f"Wrote the configuration to {options['output']}.")
        else:
            self.stdout.write(text, ending="")
