"""``./run dev``: everything a newcomer needs, in one command, on the embedded default."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command, get_commands
from django.core.management.base import BaseCommand, CommandParser

from gateway.config.modules import CODE_MODULES
from gateway.demo import replica_env, replica_ports
from gateway.startup import server_command


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Command(BaseCommand):
    help = (
        "Development run: migrate, create a dev admin user and token, start the demo "
        "modules, the health-check worker and the gateway (DEBUG on)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=int(os.environ.get("VX11_PORT", "8000")))
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--no-demo", action="store_true", help="Do not start demo modules")
        parser.add_argument("--workers", type=int, default=1)
        parser.add_argument(
            "--replicas",
            type=int,
            default=1,
            help="Demo replicas per module (targets of a pool, SPEC §18), from port 8100",
        )

    def credentials(self) -> dict[str, str]:
        path = Path(settings.VAR_DIR) / "dev-credentials.json"
        data: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        changed = False
        factories: tuple[tuple[str, Callable[[], str]], ...] = (
            ("token", lambda: "dev_" + secrets.token_urlsafe(24)),
            ("admin_password", lambda: secrets.token_urlsafe(12)),
        )
        for key, factory in factories:
            if key not in data:
                data[key] = factory()
                changed = True
        if changed:
            path.write_text(json.dumps(data, indent=2))
            path.chmod(0o600)
        return data

    def admin_user(self, password: str) -> None:
        """The dev superuser ``admin`` with the stored password."""
        user, created = get_user_model().objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True}
        )
        if created or not user.check_password(password):
            user.set_password(password)
            user.is_staff = user.is_superuser = True
            user.save()

    def start_workers(
        self, env: dict[str, str], no_demo: bool, replicas: int = 1
    ) -> list[subprocess.Popen[bytes]]:
        """The demo modules (unless their port is taken) and the health-check worker."""
        children: list[subprocess.Popen[bytes]] = []
        manage = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py")]
        if not no_demo and replicas > 1:
            pools = replica_ports(list(CODE_MODULES), replicas)
            env.update(replica_env(pools))  # the gateway and the worker call the replicas
            self.stdout.write(f"==> starting {replicas} demo replicas per module (from port 8100)")
            demo = [*manage, "run_demo_modules", "--replicas", str(replicas)]
            children.append(subprocess.Popen(demo, env=env))
        elif not no_demo:
            if _port_busy(8002):
                self.stdout.write("==> demo modules: port 8002 busy, assuming they run already")
            else:
                self.stdout.write("==> starting demo modules (ports 8001-8011)")
                children.append(subprocess.Popen([*manage, "run_demo_modules"], env=env))
        if "run_health_checks" in get_commands():
            self.stdout.write("==> starting the health-check worker")
            children.append(subprocess.Popen([*manage, "run_health_checks"], env=env))
        return children

    def start_server(
        self, env: dict[str, str], options: dict[str, Any], children: list[subprocess.Popen[bytes]]
    ) -> subprocess.Popen[bytes]:
        """The gateway, once it listens (exits the command when it cannot start)."""
        host, port = options["host"], options["port"]
        if _port_busy(port):
            self.stderr.write(f"error: port {port} is in use; pass --port N or set VX11_PORT")
            self._stop(children)
            raise SystemExit(1)
        server = subprocess.Popen(
            server_command(host, port, options["workers"]),
            env=env,
            cwd=settings.BASE_DIR,
        )
        children.append(server)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _port_busy(port):
            if server.poll() is not None:
                self._stop(children)
                raise SystemExit("error: the gateway exited during start-up (see above)")
            time.sleep(0.1)
        return server

    def banner(self, base: str, token: str, password: str) -> None:
        self.stdout.write(
            self.style.SUCCESS(f"""
VX11 Gateway (development) is up at {base}
  admin       {base}/admin/        user: admin   password: {password}
  dashboard   {base}/admin/dashboard/
  API docs    {base}/docs   (ReDoc: {base}/redoc, schema: {base}/openapi.json)
  token       {token}
  (credentials are kept in {Path(settings.VAR_DIR) / "dev-credentials.json"})

Try it:
  curl -s -H 'X-VX11-Token: {token}' -H 'Content-Type: application/json' \\
       -d '{{"prompt":"hi"}}' {base}/vx11/route/chat
Press Ctrl-C to stop.
""")
        )
        self.stdout.flush()

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write("==> migrating the database")
        call_command("migrate", verbosity=0, interactive=False)
        creds = self.credentials()
        self.admin_user(creds["admin_password"])
        env = {**os.environ, "DJANGO_DEBUG": "1", "PYTHONUNBUFFERED": "1"}
        token = env.get("VX11_TOKEN") or creds["token"]
        env["VX11_TOKEN"] = token
        children = self.start_workers(env, options["no_demo"], options["replicas"])
        server = self.start_server(env, options, children)
        self.banner(f"http://{options['host']}:{options['port']}", token, creds["admin_password"])
        stop = {"now": False}

        def _signal(*_: Any) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, _signal)
        signal.signal(signal.SIGTERM, _signal)
        while not stop["now"] and server.poll() is None:
            time.sleep(0.2)
        self._stop(children)

    def _stop(self, children: list[subprocess.Popen[bytes]]) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
