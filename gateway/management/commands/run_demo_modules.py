from __future__ import annotations

import asyncio
import signal
from typing import Any

from aiohttp import web
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.demo import (
    REPLICA_BASE,
    default_ports,
    replica_env,
    replica_ports,
    serve,
    serve_replicas,
)


class Command(BaseCommand):
    help = (
        "Run stub VX11 modules on their default ports (madre 8001, switch 8002, …); "
        "--replicas N runs N of each on consecutive ports (from 8100) and prints the "
        "VX11_MODULE_<NAME>_URL lists that point the gateway at them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--only", nargs="*", default=None, help="Module names to run")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument(
            "--replicas",
            type=int,
            default=1,
            help="Replicas per module (1–10); more than one: on consecutive ports from --base-port",
        )
        parser.add_argument(
            "--base-port",
            type=int,
            default=REPLICA_BASE,
            help=f"First replica port with --replicas (default {REPLICA_BASE})",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        ports = default_ports()
        if options["only"]:
            unknown = set(options["only"]) - set(ports)
            if unknown:
                raise CommandError(f"Unknown module(s): {', '.join(sorted(unknown))}")
            ports = {k: v for k, v in ports.items() if k in options["only"]}
        if not 1 <= options["replicas"] <= 10:
            raise CommandError("--replicas must be 1 to 10")
        if options["replicas"] > 1:
            pools = replica_ports(list(ports), options["replicas"], options["base_port"])
            asyncio.run(self._run_replicas(pools, options["host"]))
            return
        asyncio.run(self._run(ports, options["host"]))

    async def _run(self, ports: dict[str, int], host: str) -> None:
        try:
            runners = await serve(ports, host)
        except OSError as exc:
            raise CommandError(f"Cannot listen: {exc}. Is another copy running?") from exc
        for name, port in ports.items():
            self.stdout.write(f"demo {name:<13} http://{host}:{port}")
        self.stdout.flush()
        await self._until_stopped(runners)

    async def _run_replicas(self, pools: dict[str, list[int]], host: str) -> None:
        try:
            runners = await serve_replicas(pools, host)
        except OSError as exc:
            raise CommandError(f"Cannot listen: {exc}. Is another copy running?") from exc
        for name, found in pools.items():
            self.stdout.write(f"demo {name:<13} " + " ".join(f"http://{host}:{p}" for p in found))
        self.stdout.write("Point the gateway (and the health worker) at them:")
        for key, value in replica_env(pools, host).items():
            self.stdout.write(f"export {key}={value}")
        self.stdout.flush()
        await self._until_stopped(list(runners.values()))

    async def _until_stopped(self, runners: list[web.AppRunner]) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for runner in runners:
            await runner.cleanup()
