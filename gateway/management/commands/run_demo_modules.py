from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.demo import default_ports, serve


class Command(BaseCommand):
    help = "Run stub VX11 modules on their default ports (madre 8001, switch 8002, …)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--only", nargs="*", default=None, help="Module names to run")
        parser.add_argument("--host", default="127.0.0.1")

    def handle(self, *args: Any, **options: Any) -> None:
        ports = default_ports()
        if options["only"]:
            unknown = set(options["only"]) - set(ports)
            if unknown:
                raise CommandError(f"Unknown module(s): {', '.join(sorted(unknown))}")
            ports = {k: v for k, v in ports.items() if k in options["only"]}
        asyncio.run(self._run(ports, options["host"]))

    async def _run(self, ports: dict[str, int], host: str) -> None:
        try:
            runners = await serve(ports, host)
        except OSError as exc:
            raise CommandError(f"Cannot listen: {exc}. Is another copy running?") from exc
        for name, port in ports.items():
            self.stdout.write(f"demo {name:<13} http://{host}:{port}")
        self.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for runner in runners:
            await runner.cleanup()
