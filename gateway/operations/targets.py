"""A module's targets for operators (SPEC §1, §18): list them, add, change and remove rows.

The configuration half lives here: the targets in effect (``Target`` rows, else the env list
or the code URL, see ``gateway.config.modules``) and the row writes the API and the admin
make. What the request path knows of each target now (health, ejection, requests in flight)
comes from :func:`target_runtime`, merged into every listing.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from django.db import transaction
from redis.exceptions import RedisError

from gateway.config.modules import ModuleInfo
from gateway.models import Module, Target
from gateway.operations import registry
from gateway.operations.configuration import module_table
from gateway.operations.probes import load_target_health
from gateway.policies.outlier import outlier_config
from gateway.state import store
from gateway.state.ejections import Outliers
from gateway.state.redis_outliers import parse_outliers

log = logging.getLogger("gateway.targets")
#: A target the health worker has not probed yet (or whose result is not shared here).
UNKNOWN_TARGET: dict[str, Any] = {
    "status": "unknown",
    "latency_ms": None,
    "last_check": None,
    "consecutive_failures": 0,
    "last_error": "",
}

#: The fields of a ``Target`` row a caller may set.
TARGET_FIELDS = ("url", "weight", "enabled")


#: A module's live state read for a listing is reused this long (one read per module, not
#: per target, and one per listing of all modules).
RUNTIME_TTL = 0.5
_runtime: dict[str, tuple[float, Outliers, dict[str, dict[str, Any]]]] = {}


def _module_runtime(module: str) -> tuple[Outliers, dict[str, dict[str, Any]]]:
    """``module``'s outlier view (ejections, down flags) and per-target health results:
    from Redis when it is configured (the shared state every process and host agrees on),
    else this process's (the request path's own memory)."""
    now = time.time()
    seen = _runtime.get(module)
    if seen is not None and now - seen[0] < RUNTIME_TTL:
        return seen[1], seen[2]
    cfg = outlier_config()
    try:
        if store.shared():
            raw = store.sync_client().hgetall(f"vx11:od:{module}")
            flat = [part for item in cast(dict[bytes, bytes], raw).items() for part in item]
            view = parse_outliers(flat, now, cfg)
        else:
            view = registry.memory_outlier_store().view(module, now, cfg)
    except RedisError:
        log.warning("outlier state unreadable for a listing", extra={"gw_module": module})
        view = Outliers()
    health = load_target_health([module]).get(module, {})
    _runtime[module] = (now, view, health)
    return view, health


def target_runtime(module: str, key: str) -> dict[str, Any]:
    """What the gateway knows of target ``key`` of ``module`` now, beside its configuration
    (SPEC §18): ``health`` (the health worker's last result: status ``up`` / ``down`` /
    ``unknown``, latency, last check, consecutive failures, last error), ``down`` (the
    worker's flag the choice reads), ``ejected_until`` (epoch seconds, ``None``: not ejected),
    ``ejections`` (the decayed count) and ``in_flight`` (this process's attempts)."""
    view, health = _module_runtime(module)
    pool = registry.process_balancer().pools().get(module)
    in_flight = sum(t.in_flight for t in pool.targets if t.key == key) if pool else 0
    return {
        "health": health.get(key, UNKNOWN_TARGET),
        "down": key in view.down,
        "ejected_until": view.ejected.get(key),
        "ejections": view.ejections.get(key, 0),
        "in_flight": in_flight,
    }


def target_list(info: ModuleInfo) -> list[dict[str, Any]]:
    """A module's targets in effect: ``id`` (``None`` for env/code targets), ``url``,
    ``weight``, ``enabled``, ``key``, and :func:`target_runtime`'s fields."""
    return [{**t.as_dict(), **target_runtime(info.name, t.key)} for t in info.targets]


def module_info(name: str) -> ModuleInfo | None:
    """The module in effect now (read from the database), ``None`` when it is unknown."""
    return module_table().get(name)


def target_dict(module: str, row: Target) -> dict[str, Any]:
    info = row.info()
    return {**info.as_dict(), **target_runtime(module, info.key)}


def get_target(module: str, pk: int) -> Target | None:
    return Target.objects.filter(module__name=module, pk=pk).first()


def save_target(module: str, values: dict[str, Any], row: Target | None = None) -> Target:
    """Create (``row`` None) or change a target of ``module`` (an existing module; one
    without a ``Module`` row, e.g. from the env only, gets one). The model's checks run
    first: a ``ValidationError`` by field. One transaction, one version bump."""
    with transaction.atomic():
        if row is None:
            parent, _ = Module.objects.get_or_create(name=module)
            row = Target(module=parent)
        for name, value in values.items():
            if name in TARGET_FIELDS:
                setattr(row, name, value)
        row.full_clean()
        row.save()
    return row


def delete_target(row: Target) -> None:
    row.delete()


__all__ = [
    "TARGET_FIELDS",
    "UNKNOWN_TARGET",
    "delete_target",
    "get_target",
    "module_info",
    "save_target",
    "target_dict",
    "target_list",
    "target_runtime",
]
