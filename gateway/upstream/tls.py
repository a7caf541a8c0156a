"""The one TLS trust configuration of every outbound client (module calls and health probes).

The system's trust store with the standard library's defaults (certificate and host name
verified, TLS 1.2 at least): ``ssl.create_default_context()``, built once per process and
shared by ``gateway.upstream.h1`` and the streaming (aiohttp) client. A module behind a
private CA is trusted the way the operating system trusts it (``update-ca-certificates``,
``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` as OpenSSL reads them).
"""

from __future__ import annotations

import ssl
from functools import cache


@cache
def client_context() -> ssl.SSLContext:
    """The client SSL context (one per process; contexts are safe to share across loops)."""
    return ssl.create_default_context()


__all__ = ["client_context"]
