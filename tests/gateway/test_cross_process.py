"""Other processes on the gateway's database reach a running gateway within a second (SPEC §0).

A real gateway (``uvicorn`` in its own OS process, the embedded SQLite file, no Redis
unless said) is changed by ``manage.py`` commands and shells in processes of their own:
API clients created and revoked, a revocation through ``QuerySet.update()`` (no signal),
breaker actions. On PostgreSQL (``DATABASE_URL``, tests/runner.py) the same tests run on a
fresh PostgreSQL database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import OPERATOR_TOKEN, wait_until
from tests.servers import ROOT, GatewayProcess, UpstreamServer, fresh_database_url

pytestmark = [pytest.mark.db_backend, pytest.mark.reliability]

#: SPEC §0: a change reaches the running gateway within this many seconds.
WITHIN = 1.0


def manage(env: dict[str, str], *args: str) -> str:
    """Run ``manage.py ARGS`` in a process of its own; its output."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def embedded_env(upstream: UpstreamServer, **extra: str) -> dict[str, str]:
    workdir = tempfile.mkdtemp(prefix="vx11-xp-")
    env = {
        "DATABASE_URL": fresh_database_url(os.environ.get("DATABASE_URL"), workdir),
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_VAR_DIR": workdir,
        "VX11_REDIS_URL": "",
        "VX11_MODULE_SWITCH_URL": upstream.url,
        **extra,
    }
    GatewayProcess.migrate(env)
    return env


@pytest.fixture
def start_gateway() -> Iterator[Callable[[dict[str, str]], GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(env: dict[str, str]) -> GatewayProcess:
        gateway = GatewayProcess(env).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def task(client: httpx.Client, gateway: GatewayProcess, token: str) -> httpx.Response:
    return client.post(gateway.url + "/vx11/route/task", json={}, headers={"X-VX11-Token": token})


def within(predicate: Callable[[], bool], label: str = "") -> float:
    """Seconds until ``predicate`` holds (fails past 3 s); the caller compares with WITHIN."""
    started = time.monotonic()
    assert wait_until(predicate, timeout=3, interval=0.02)
    waited = time.monotonic() - started
    if label:  # ``-s`` shows it; docs/RELIABILITY.md quotes it
        print(f"\n[reliability] {label}: {waited * 1000:.0f} ms", flush=True)
    return waited


def test_a_client_created_and_revoked_by_commands_is_live_within_a_second(
    upstream: UpstreamServer, start_gateway: Any
) -> None:
    """The README tour: ``create_api_client`` printed a token the running gateway refused."""
    env = embedded_env(upstream)
    gateway = start_gateway(env)
    with httpx.Client(timeout=5) as client:
        assert task(client, gateway, OPERATOR_TOKEN).status_code == 200  # warm snapshot
        token = manage(env, "create_api_client", "tour").strip().splitlines()[-1]
        waited = within(
            lambda: task(client, gateway, token).status_code == 200, "create_api_client → accepted"
        )
        assert waited < WITHIN, f"accepted after {waited:.2f} s"

        out = manage(env, "revoke_api_client", "tour")
        assert "Revoked API client 'tour'" in out
        waited = within(
            lambda: task(client, gateway, token).status_code == 403, "revoke_api_client → refused"
        )
        assert waited < WITHIN, f"refused after {waited:.2f} s"
        assert task(client, gateway, token).json()["error"] == "forbidden"


def test_revoke_command_refuses_an_unknown_name(upstream: UpstreamServer) -> None:
    env = embedded_env(upstream)
    done = subprocess.run(
        [sys.executable, "manage.py", "revoke_api_client", "nobody"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "No API client named 'nobody'" in done.stderr


@pytest.mark.parametrize("carrier", ["database", "redis"])
def test_a_revocation_by_queryset_update_in_a_shell_reaches_the_gateway(
    upstream: UpstreamServer, start_gateway: Any, redis_url: str, carrier: str
) -> None:
    """``QuerySet.update()`` sends no signal: with Redis it never propagated."""
    env = embedded_env(upstream, VX11_REDIS_URL=redis_url if carrier == "redis" else "")
    gateway = start_gateway(env)
    with httpx.Client(timeout=5) as client:
        token = manage(env, "create_api_client", "shell-app").strip().splitlines()[-1]
        assert within(lambda: task(client, gateway, token).status_code == 200) < WITHIN
        manage(
            env,
            "shell",
            "-c",
            "from gateway.models import ApiClient; "
            "ApiClient.objects.filter(name='shell-app').update(active=False)",
        )
        waited = within(
            lambda: task(client, gateway, token).status_code == 403,
            f"QuerySet.update() revocation ({carrier}) → refused",
        )
        assert waited < WITHIN, f"refused after {waited:.2f} s"


def status_row(env: dict[str, str], module: str) -> list[str]:
    lines = manage(env, "breaker", "status", module).splitlines()
    assert lines[0].split()[:4] == ["MODULE", "STATE", "FORCED", "FAILURES"]
    return lines[1].split()


def test_the_breaker_command_without_redis_drives_the_running_gateway(
    upstream: UpstreamServer, start_gateway: Any
) -> None:
    env = embedded_env(upstream)
    gateway = start_gateway(env)
    with httpx.Client(timeout=5) as client:

        def refused() -> bool:
            r = task(client, gateway, OPERATOR_TOKEN)
            return r.status_code == 503 and r.json()["error"] == "circuit_open"

        assert task(client, gateway, OPERATOR_TOKEN).status_code == 200
        assert "switch: force_open done, now open" in manage(env, "breaker", "open", "switch")
        waited = within(refused, "breaker open (no Redis) → 503 circuit_open")
        assert waited < WITHIN, f"open after {waited:.2f} s"
        assert status_row(env, "switch")[:3] == ["switch", "open", "open"]
        assert status_row(env, "madre")[:3] == ["madre", "closed", "-"]

        manage(env, "breaker", "close", "switch")
        waited = within(lambda: task(client, gateway, OPERATOR_TOKEN).status_code == 200)
        assert waited < WITHIN, f"closed after {waited:.2f} s"
        assert status_row(env, "switch")[:3] == ["switch", "closed", "closed"]

        manage(env, "breaker", "open", "switch")
        assert within(refused) < WITHIN
        manage(env, "breaker", "reset", "switch")
        waited = within(lambda: task(client, gateway, OPERATOR_TOKEN).status_code == 200)
        assert waited < WITHIN, f"reset after {waited:.2f} s"
        assert status_row(env, "switch")[:3] == ["switch", "closed", "-"]


def test_a_forced_breaker_outlives_a_gateway_restart_without_redis(
    upstream: UpstreamServer, start_gateway: Any
) -> None:
    """As in Redis, the override is kept: a restarted process applies the standing one."""
    env = embedded_env(upstream)
    manage(env, "breaker", "open", "switch")
    gateway = start_gateway(env)
    with httpx.Client(timeout=5) as client:
        r = task(client, gateway, OPERATOR_TOKEN)
        assert r.status_code == 503 and r.json()["error"] == "circuit_open"
        manage(env, "breaker", "auto", "switch")
        assert within(lambda: task(client, gateway, OPERATOR_TOKEN).status_code == 200) < WITHIN


def test_every_write_path_bumps_the_version_in_the_database(transactional_db: None) -> None:
    """Bulk writes send no signal; each still bumps ``ConfigVersion`` once committed."""
    from gateway.models import ApiClient, ConfigVersion, Module, Route

    seen = [ConfigVersion.read()]

    def bumped() -> bool:
        seen.append(ConfigVersion.read())
        return seen[-1] > seen[-2]

    client = ApiClient(name="bulk")
    client.set_new_token()
    client.save()
    assert bumped()
    ApiClient.objects.filter(name="bulk").update(active=False)
    assert bumped()
    Module.objects.bulk_create([Module(name="extra", url="http://127.0.0.1:9")])
    assert bumped()
    module = Module.objects.get(name="extra")
    module.enabled = False
    Module.objects.bulk_update([module], ["enabled"])
    assert bumped()
    Route.objects.bulk_create([Route(intent="task", timeout=5.0)])
    assert bumped()
    Route.objects.filter(intent="task").delete()
    assert bumped()
    ApiClient.objects.filter(name="nobody").update(active=False)  # no row: no bump
    assert not bumped()


def test_loaddata_bumps_the_version_in_the_database(transactional_db: None, tmp_path: Path) -> None:
    """``loaddata`` saves raw (``Model.save_base``, not ``ConfigModel.save``): only the
    ``post_save`` receiver announces it, and it still bumps ``ConfigVersion``."""
    from django.core.management import call_command

    from gateway.models import ConfigVersion, Module

    fixture = tmp_path / "modules.json"
    row = {"name": "loaded", "url": "http://127.0.0.1:9", "updated_at": "2024-01-01T00:00:00Z"}
    fixture.write_text(json.dumps([{"model": "gateway.module", "pk": 900, "fields": row}]))
    before = ConfigVersion.read()
    call_command("loaddata", str(fixture), verbosity=0)
    assert Module.objects.filter(name="loaded").exists()
    assert ConfigVersion.read() > before


def next_transition(ws: ClientConnection, timeout: float) -> dict[str, Any] | None:
    """The first ``breaker.transition`` event on the stream within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            event: dict[str, Any] = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            return None
        if event.get("type") == "breaker.transition":
            return event
    return None


def test_a_breaker_command_reaches_an_open_event_stream_without_redis(
    upstream: UpstreamServer,
) -> None:
    """The command is applied and published on the server's loop, not the watcher's thread.

    The gateway runs asyncio in debug mode, which refuses a foreign thread's call into the
    loop: published from the watcher's thread into the loop's channel layer, the event was
    lost (uvloop takes the call and delivers it late, whenever the loop wakes).
    """
    env = embedded_env(upstream, PYTHONASYNCIODEBUG="1")
    gateway = GatewayProcess(env, server_args=("--loop", "asyncio")).start()
    try:
        uri = gateway.url.replace("http://", "ws://") + "/ws/events"
        headers = {"X-VX11-Token": OPERATOR_TOKEN}
        with connect(uri, additional_headers=headers, open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "snapshot"
            manage(env, "breaker", "open", "switch")
            event = next_transition(ws, 3.0)
            assert event is not None, gateway.output()[-3000:]
            assert (event["module"], event["to"], event["reason"]) == (
                "switch",
                "open",
                "force_open",
            )
    finally:
        gateway.stop()
    assert "Non-thread-safe" not in gateway.output()


def test_the_version_is_bumped_in_the_writing_transaction_once(transactional_db: None) -> None:
    """Committed together or not at all: no change can commit without its bump."""
    from django.db import transaction

    from gateway.models import ApiClient, ConfigVersion, Module

    before = ConfigVersion.read()
    with transaction.atomic():
        Module.objects.create(name="extra", url="http://127.0.0.1:9")
        assert ConfigVersion.read() == before + 1  # in the transaction, not after it
        ApiClient.objects.filter(name="nobody").update(active=False)
        Module.objects.filter(name="extra").update(enabled=False)
        Module.objects.get(name="extra").delete()
    assert ConfigVersion.read() == before + 1  # several writes, one bump

    with pytest.raises(RuntimeError), transaction.atomic():
        Module.objects.create(name="other", url="http://127.0.0.1:9")
        raise RuntimeError("rolled back")
    assert ConfigVersion.read() == before + 1  # the bump rolled back with the write

    with transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():  # a savepoint rolled back
            Module.objects.create(name="other", url="http://127.0.0.1:9")
            raise RuntimeError("rolled back")
        Module.objects.create(name="third", url="http://127.0.0.1:9")
    assert ConfigVersion.read() == before + 2  # the later write bumped again


@pytest.mark.postgresql  # Django never closes an in-memory SQLite connection: nothing to see
def test_the_watcher_thread_keeps_its_database_connection(transactional_db: None) -> None:
    """One connection for the watcher's life, not a new one twice a second."""
    import threading

    from django.db import connection

    from gateway.config.snapshot import ConfigWatcher

    class DatabaseWatcher(ConfigWatcher):
        def carrier(self) -> str | None:
            return "db"  # the test database is in memory here; the look is the same

    watcher = DatabaseWatcher()
    held: list[object] = []

    def look_twice() -> None:
        for _ in range(2):
            watcher.poll()
            held.append(connection.connection)
        connection.close()

    thread = threading.Thread(target=look_twice)
    thread.start()
    thread.join(10)
    assert len(held) == 2 and held[0] is not None and held[0] is held[1]
