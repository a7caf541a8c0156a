"""What the pipelined connection (``gateway.state.resp``) takes from a Redis URL.

The URL is read by redis-py's own ``parse_url``, and TLS is set up by redis-py's own
``RedisSSLContext`` with ``SSLConnection``'s defaults, so the request path's connection
trusts exactly what the gateway's redis-py clients trust: TLS when the scheme is
``rediss://``, and every ``ssl_*`` option redis-py's asyncio ``SSLConnection`` honours
(:data:`SSL_OPTIONS`: a private CA in ``ssl_ca_certs``, ``ssl_cert_reqs=none``, a client
certificate, ``ssl_check_hostname``, ...).

An option the connection cannot honour is refused, never dropped: a dropped TLS option
would either fail every call (and the policies would silently fall back to per-process
state) or weaken the trust the operator asked for. :func:`check_url` raises
:class:`UnsupportedRedisURL` (an ``ImproperlyConfigured``) for such a URL; the system check
calls it at start-up, and :class:`~gateway.state.resp.PipelinedRedis` refuses the URL too.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlparse

from django.core.exceptions import ImproperlyConfigured
from redis.asyncio.connection import RedisSSLContext, parse_url
from redis.exceptions import RedisError

#: ``ssl_*`` URL options (redis-py's ``SSLConnection`` arguments), all honoured.
SSL_OPTIONS = frozenset(
    {
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_include_verify_flags",
        "ssl_exclude_verify_flags",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_password",
    }
)
#: What ``SSLConnection`` assumes when the URL says nothing (verify, and check the name).
SSL_DEFAULTS: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
#: Where to connect and who to be: honoured.
CONNECT_OPTIONS = frozenset(
    {"host", "port", "path", "db", "username", "password", "connection_class"}
)
#: Pool and socket tuning for redis-py's clients. The pipelined connection has no pool and
#: its timeouts are the gateway's (``VX11_STORE_TIMEOUT``); these do not change what is
#: trusted or answered, so they are accepted and left to redis-py's clients.
IGNORED_OPTIONS = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_read_size",
        "retry_on_timeout",
        "max_connections",
        "health_check_interval",
        "timeout",
        "client_name",
        # How redis-py's clients decode answers and which RESP version they speak: the
        # pipelined connection reads raw RESP2 bytes of its own scripts either way.
        "decode_responses",
        "encoding",
        "encoding_errors",
        "protocol",
    }
)


class UnsupportedRedisURL(ImproperlyConfigured):
    """The Redis URL asks for something the request path's connection cannot honour."""


def is_tls(url: str) -> bool:
    return urlparse(url).scheme == "rediss"


def connect_options(url: str) -> tuple[dict[str, Any], RedisSSLContext | None]:
    """The URL's connection options, and its TLS settings when the scheme is ``rediss``.

    Raises :class:`UnsupportedRedisURL` for an option that cannot be honoured.
    """
    try:
        options: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise UnsupportedRedisURL(f"VX11_REDIS_URL: {exc}") from exc
    tls = is_tls(url)
    ssl_given = sorted(name for name in options if name == "ssl" or name.startswith("ssl_"))
    unknown = sorted(
        name
        for name in options
        if name not in CONNECT_OPTIONS
        and name not in IGNORED_OPTIONS
        and name not in SSL_OPTIONS
        and name not in ssl_given
    )
    if unknown:
        raise UnsupportedRedisURL(
            f"VX11_REDIS_URL: option(s) {', '.join(unknown)} not supported by the "
            "gateway's pipelined Redis connection"
        )
    if ssl_given and not tls:
        raise UnsupportedRedisURL(
            f"VX11_REDIS_URL: {', '.join(ssl_given)} given for a plain connection; "
            "use the rediss:// scheme for TLS"
        )
    unknown_tls = [name for name in ssl_given if name not in SSL_OPTIONS]
    if unknown_tls:
        raise UnsupportedRedisURL(
            f"VX11_REDIS_URL: option(s) {', '.join(unknown_tls)} not supported by the "
            "gateway's pipelined Redis connection"
        )
    if not tls:
        return options, None
    settings = {**SSL_DEFAULTS, **{name: options[name] for name in ssl_given}}
    try:
        context = RedisSSLContext(**{name.removeprefix("ssl_"): v for name, v in settings.items()})
    except RedisError as exc:  # e.g. ssl_cert_reqs=maybe
        raise UnsupportedRedisURL(f"VX11_REDIS_URL: {exc}") from exc
    return options, context


def check_url(url: str) -> None:
    """Raise :class:`UnsupportedRedisURL` unless the pipelined connection honours ``url``
    entirely (its options, and its TLS files: they are loaded here)."""
    _, context = connect_options(url)
    if context is None:
        return
    try:
        context.get()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise UnsupportedRedisURL(f"VX11_REDIS_URL: cannot set up TLS: {exc}") from exc


__all__ = [
    "IGNORED_OPTIONS",
    "SSL_OPTIONS",
    "UnsupportedRedisURL",
    "check_url",
    "connect_options",
    "is_tls",
]
