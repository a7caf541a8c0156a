"""Context-7 test helpers: a pinned wall clock and a subprocess runner on a file database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FakeClock

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def now(clock: FakeClock) -> Callable[[], datetime]:
    """The fake clock as an aware datetime: ``now()`` after ``clock.advance(...)``."""
    return lambda: datetime.fromtimestamp(clock.now, UTC)


class Process:
    """Runs Python code in a fresh interpreter on the embedded default database.

    The database is a SQLite file in ``var_dir`` with the production settings
    (WAL, ``BEGIN IMMEDIATE``, busy timeout): each run is a gateway "restart".
    """

    def __init__(self, var_dir: Path) -> None:
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VX11_", "DATABASE_URL", "DJANGO_"))
        }
        self.env.update(
            VX11_VAR_DIR=str(var_dir),
            VX11_TOKEN="ctx7-test-operator-token",
            DJANGO_SETTINGS_MODULE="vx11site.settings",
            PYTHONPATH=str(ROOT),
        )

    def run(self, code: str, **knobs: object) -> Any:
        """Run ``code`` after ``django.setup()``; it must print one JSON line last."""
        env = {**self.env, **{k: str(v) for k, v in knobs.items()}}
        script = "import django, json\ndjango.setup()\n" + code
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def migrate(self) -> None:
        done = subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def process(tmp_path: Path) -> Process:
    proc = Process(tmp_path)
    proc.migrate()
    return proc
