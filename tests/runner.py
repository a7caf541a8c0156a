"""The whole test suite, as ``./run test`` (and CI) runs it.

Pass 1: every test on the embedded default (SQLite), in parallel.
Pass 2: the database-layer tests (marker ``db_backend``) again on a real
PostgreSQL server started here on a free port: among them the schemathesis run over
/openapi.json with response-schema conformance (tests/reliability/test_hostile.py), since
PostgreSQL refuses input SQLite stores (a NUL in text is a ``DataError`` there).
Extra arguments go to both pytest runs (e.g. ``-k breaker``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.servers import PostgresServer


def pytest(args: list[str], env: dict[str, str]) -> int:
    cmd = [sys.executable, "-m", "pytest", *args]
    print("==>", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def main(argv: list[str]) -> int:
    workers = os.environ.get("VX11_TEST_WORKERS", "auto")
    base = ["-n", workers, "-q", "--dist", "loadfile", *argv]
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    started = time.monotonic()
    code = pytest(base, env)
    print(
        f"==> SQLite pass finished in {time.monotonic() - started:.0f}s (exit {code})", flush=True
    )
    pg = PostgresServer().start()
    try:
        pg_env = {**env, "DATABASE_URL": pg.url}
        pg_code = pytest([*base, "-m", "db_backend"], pg_env)
    finally:
        pg.close()
    if pg_code == 5:  # no db_backend test selected (e.g. a -k filter)
        pg_code = 0
    print(
        f"==> PostgreSQL pass exit {pg_code}; total {time.monotonic() - started:.0f}s", flush=True
    )
    return code or pg_code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
