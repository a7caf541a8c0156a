"""Container health probe: exit 0 when the gateway's ``GET /health`` answers 200.

The slim image has no curl, so Docker's HEALTHCHECK runs this. ``/health`` is a
Django view, and Django answers 400 to a Host header outside
``DJANGO_ALLOWED_HOSTS``, so the probe sends a host name from that list
(``localhost`` or ``127.0.0.1`` when listed). Usage: ``python healthcheck.py [URL]``
(default ``http://127.0.0.1:8000/health``).
"""

from __future__ import annotations

import http.client
import os
import sys
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8000/health"
LOCAL_NAMES = ("localhost", "127.0.0.1")


def host_header(allowed_hosts: str, fallback: str) -> str:
    """A Host value Django accepts, chosen from a ``DJANGO_ALLOWED_HOSTS`` value."""
    names = [name.strip() for name in allowed_hosts.split(",") if name.strip()]
    if not names or "*" in names:
        return fallback
    for name in LOCAL_NAMES:
        if name in names:
            return name
    return names[0].lstrip(".")  # ".example.com" also allows "example.com"


def probe(url: str, allowed_hosts: str | None, timeout: float = 3.0) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    if allowed_hosts is None:
        allowed_hosts = "localhost,127.0.0.1,[::1]"  # the settings' default
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(
            "GET", parts.path or "/health", headers={"Host": host_header(allowed_hosts, host)}
        )
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else DEFAULT_URL
    return 0 if probe(url, os.environ.get("DJANGO_ALLOWED_HOSTS")) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
