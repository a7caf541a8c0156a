"""An imported configuration is live in every gateway process within a second (SPEC §21).

Two real gateway processes (``uvicorn``, each its own OS process) on one database (the
embedded SQLite file, or a fresh PostgreSQL database in the PostgreSQL pass), no Redis: the
version row is the carrier. ``manage.py import_config`` runs in a third process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import OPERATOR_TOKEN
from tests.gateway.test_cross_process import WITHIN, embedded_env, manage, start_gateway, within
from tests.servers import ROOT, UpstreamServer

__all__ = ["start_gateway"]  # the fixture, used by name

pytestmark = [pytest.mark.db_backend, pytest.mark.reliability]

HEADERS = {"X-VX11-Token": OPERATOR_TOKEN}


def call(client: httpx.Client, url: str, intent: str) -> int:
    return client.post(f"{url}/vx11/route/{intent}", json={}, headers=HEADERS).status_code


def test_an_import_switches_both_gateways_within_a_second(
    upstream: UpstreamServer, start_gateway: Any, tmp_path: Path
) -> None:
    env = embedded_env(upstream)
    first, second = start_gateway(env), start_gateway(env)
    doc = tmp_path / "config.yaml"
    with httpx.Client(timeout=5) as client:
        for gateway in (first, second):  # warm snapshots: the old table
            assert call(client, gateway.url, "task") == 200
            assert call(client, gateway.url, "added") == 404
        doc.write_text(
            "routes:\n  task: {enabled: false}\n  added: {module: switch, endpoint: /switch/task}\n"
        )
        out = manage(env, "import_config", str(doc))
        assert "changed route task" not in out  # no row before: it is added
        assert "added route task" in out and "added route added" in out

        def switched(url: str) -> bool:
            return call(client, url, "task") == 404 and call(client, url, "added") == 200

        for gateway, label in ((first, "first"), (second, "second")):
            waited = within(partial(switched, gateway.url), f"import_config → {label} gateway")
            assert waited < WITHIN, f"{label} gateway switched after {waited:.2f} s"

        exported = manage(env, "export_config")
        doc.write_text(exported)
        assert manage(env, "import_config", str(doc)).strip() == "No changes."


def test_an_invalid_file_exits_1_and_the_gateway_keeps_its_table(
    upstream: UpstreamServer, start_gateway: Any, tmp_path: Path
) -> None:
    env = embedded_env(upstream)
    gateway = start_gateway(env)
    doc = tmp_path / "bad.yaml"
    doc.write_text("routes:\n  task: {enabled: false}\n  chat: {timeout: 0}\n")
    done = subprocess.run(
        [sys.executable, "manage.py", "import_config", str(doc)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "routes.chat.timeout: Timeout must be between 0.1 and 600" in done.stderr
    with httpx.Client(timeout=5) as client:
        assert call(client, gateway.url, "task") == 200  # the valid half was not applied
