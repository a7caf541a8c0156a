"""Configuration operations: the module and route tables as they are in effect now.

Code defaults, ``VX11_MODULE_*`` environment overrides and database rows are merged by
``gateway.config``; these functions read the merged tables for the API, the admin and the
commands (which must not depend on a running gateway's snapshot).
"""

from __future__ import annotations

from typing import Any

from gateway.config.modules import CODE_MODULES, ModuleInfo, env_overrides, env_targets
from gateway.config.routes import build_routes
from gateway.config.snapshot import load_snapshot
from gateway.models import Route


def module_table() -> dict[str, ModuleInfo]:
    """Every known module (code, env, database), read now from the database."""
    return load_snapshot(0).modules


def module_url(name: str, stored: str = "") -> str:
    """The URL a module is called at: its database row's, else the env's, else the code's."""
    if stored:
        return stored
    return env_overrides()[0].get(name) or CODE_MODULES.get(name, "—")


def module_defaults(name: str) -> tuple[str | None, str | None]:
    """A module's URL from the code and from the environment (its list of targets, comma
    separated; None where it has none)."""
    return CODE_MODULES.get(name), ", ".join(env_targets()[0].get(name, ())) or None


def effective_routes() -> dict[str, dict[str, Any]]:
    """The route table in effect (code defaults overlaid by overrides), by intent."""
    return {
        intent: cfg.as_dict() for intent, cfg in build_routes(list(Route.objects.all())).items()
    }
