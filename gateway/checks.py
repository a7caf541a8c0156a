"""System checks with stable ids for misconfiguration (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from gateway.config.modules import env_lbs, env_overrides
from gateway.core.conf import gw
from gateway.state.redis_url import UnsupportedRedisURL, check_url, connect_options
from vx11site.env import EnvError


@register("vx11")
def gateway_checks(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        gw.reload()
        _ = gw.token
    except EnvError as exc:
        return [
            Error(
                str(exc),
                id="gateway.E001",
                hint="Fix the variable's value; docs/CONFIGURATION.md lists them all.",
            )
        ]
    return [*_module_urls(), *_redis_url(), *_authentication(), *_workers()]


def _module_urls() -> list[CheckMessage]:
    found: list[CheckMessage] = [
        Error(
            f"Invalid module URL: {problem}",
            id="gateway.E002",
            hint="Use http(s)://host[:port] with no path.",
        )
        for problem in env_overrides()[1]
    ]
    found.extend(
        Error(
            f"Invalid balancing policy: {problem}",
            id="gateway.E004",
            hint="Use least_request, round_robin or session.",
        )
        for problem in env_lbs()[1]
    )
    return found


def _redis_url() -> list[CheckMessage]:
    if not gw.redis_url:
        return []
    try:
        check_url(gw.redis_url)
    except UnsupportedRedisURL as exc:
        return [
            Error(
                str(exc),
                id="gateway.E003",
                hint="Use the options redis-py documents for redis:// and rediss:// URLs.",
            )
        ]
    options, _ = connect_options(gw.redis_url)
    if str(options.get("ssl_cert_reqs", "required")).lower() in {"none", "0"} or (
        options.get("ssl_check_hostname") is False
    ):
        return [
            Warning(
                "VX11_REDIS_URL turns TLS verification off (ssl_cert_reqs=none or "
                "ssl_check_hostname=false): anyone on the path can pose as the store.",
                id="gateway.W006",
                hint="Give the store's CA in ssl_ca_certs instead.",
            )
        ]
    return []


def _authentication() -> list[CheckMessage]:
    if not gw.auth_enabled:
        return [
            Warning(
                "VX11_AUTH_ENABLED=false: every caller has operator rights.",
                id="gateway.W001",
                hint="Development only.",
            )
        ]
    if not gw.token and not settings.DEBUG:
        return [
            Warning(
                "Authentication is on but VX11_TOKEN is empty; the server will refuse to start.",
                id="gateway.W004",
                hint="Set VX11_TOKEN, or DJANGO_DEBUG=1 for development, or VX11_AUTH_ENABLED=false.",
            )
        ]
    return []


def _workers() -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    if gw.workers > 1 and not gw.redis_url:
        messages.append(
            Warning(
                "Several workers with in-process state: rate limits, breakers, cache and route "
                "changes are not shared between them.",
                id="gateway.W002",
                hint="Set VX11_REDIS_URL for more than one worker or host.",
            )
        )
    if gw.workers > 1 and "sqlite" in settings.DATABASES["default"]["ENGINE"]:
        messages.append(
            Warning(
                "Several workers on SQLite: writes will queue on one file.",
                id="gateway.W003",
                hint="Use DATABASE_URL=postgres://…",
            )
        )
    return messages


@register("vx11", deploy=True)
def gateway_deploy_checks(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``manage.py check --deploy``: TLS-proxy settings that disagree with each other."""
    if settings.SECURE_PROXY_SSL_HEADER and not gw.trusted_proxies:
        return [
            Warning(
                "SECURE_PROXY_SSL_HEADER is set (a TLS proxy in front) but VX11_TRUSTED_PROXIES "
                "is empty: the proxy paths ignore X-Forwarded-For/-Proto, so every client shares "
                "the proxy's address for per-IP limits and modules are told the socket scheme.",
                id="gateway.W005",
                hint="Set VX11_TRUSTED_PROXIES to the TLS proxy's CIDRs.",
            )
        ]
    return []
