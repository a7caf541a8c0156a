"""The module registry: code defaults, overlaid by env, overlaid by ``Module`` rows."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from django.core.exceptions import ValidationError

from gateway.config.shapes import BreakerSettings
from gateway.config.validation import validate_module_url

log = logging.getLogger("gateway.modules")

CODE_MODULES: dict[str, str] = {
    "madre": "http://127.0.0.1:8001",
    "switch": "http://127.0.0.1:8002",
    "hermes": "http://127.0.0.1:8003",
    "hormiguero": "http://127.0.0.1:8004",
    "manifestator": "http://127.0.0.1:8005",
    "mcp": "http://127.0.0.1:8006",
    "shub": "http://127.0.0.1:8007",
    "spawner": "http://127.0.0.1:8008",
    "operator": "http://127.0.0.1:8011",
}
ENV_ALIASES = {"shub": ("VX11_SHUB_UPSTREAM",)}


@dataclass(frozen=True, slots=True)
class ModuleInfo(BreakerSettings):
    """One module of the effective table, with its own breaker settings (keyword-only)."""

    name: str
    url: str
    health_path: str = "/health"
    enabled: bool = True
    source: str = "code"  # code | env | database


def env_overrides() -> tuple[dict[str, str], list[str]]:
    """URLs from the environment, and the errors of the invalid ones."""
    sources: dict[str, tuple[str, str]] = {}
    for key, value in os.environ.items():
        if key.startswith("VX11_MODULE_") and key.endswith("_URL") and len(key) > 16:
            sources[key[12:-4].lower()] = (key, value)
    for name, aliases in ENV_ALIASES.items():
        for alias in aliases:
            if name not in sources and alias in os.environ:
                sources[name] = (alias, os.environ[alias])
    found: dict[str, str] = {}
    errors: list[str] = []
    for name, (var, value) in sources.items():
        try:
            found[name] = validate_module_url(value)
        except ValidationError as exc:
            errors.append(f"{var}: {exc.messages[0]}")
    return found, errors


def build_modules(rows: list[ModuleInfo]) -> dict[str, ModuleInfo]:
    """The effective module table from code, env and database rows (rows with url='' inherit)."""
    table = {name: ModuleInfo(name, url) for name, url in CODE_MODULES.items()}
    env, errors = env_overrides()
    for message in errors:
        log.error("ignoring invalid module URL from the environment", extra={"detail": message})
    for name, url in env.items():
        table[name] = ModuleInfo(name, url, source="env")
    for row in rows:
        base = table.get(row.name)
        url = row.url or (base.url if base else "")
        if not url:
            log.error("module has no URL", extra={"gw_module": row.name})
            continue
        table[row.name] = replace(
            row, url=url, source="database" if row.url else (base.source if base else "code")
        )
    return table
