"""The health worker's per-target half (SPEC §18): what a target's probe result shares.

- :func:`share`: a pool of several targets keeps the worker's verdict in the shared outlier
  state (``OutlierDetector.mark_down``; the request path's view carries it as
  ``Outliers.down``, so every process skips a down target within 1 s); every failing probe
  renews the flag, the first pass clears it. A pass also returns an ejected target early.
- :func:`ejection_ends`: the ends of ejections by expiry, published once (``target.ejected``)
  by the leading checker from the same views, read once a second.
- :func:`pool_error`: the module's ``last_error`` when some of its targets are down.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.config.modules import ModuleInfo, TargetInfo
from gateway.operations import events
from gateway.operations.health_schedule import DOWN, UP, ModuleState
from gateway.policies.outlier import OutlierDetector
from gateway.state.ejections import ACTIVE_PROBE, EXPIRED, Ejection

log = logging.getLogger("gateway.health")


def enabled_targets(info: ModuleInfo) -> list[TargetInfo]:
    return [t for t in info.targets if t.enabled]


def pool_error(info: ModuleInfo, found: dict[str, dict[str, Any]]) -> str:
    """``"1 of 3 targets down: 10.0.0.6:8002: connection failed"`` ("" when none is)."""
    pool = enabled_targets(info)
    down = [
        f"{t.key}: {found[t.key]['last_error']}"
        for t in pool
        if t.key in found and found[t.key]["status"] == DOWN
    ]
    if not down:
        return ""
    return (f"{len(down)} of {len(pool)} targets down: " + "; ".join(down))[:300]


async def share(
    detector: OutlierDetector, info: ModuleInfo, key: str, before: ModuleState, state: ModuleState
) -> Ejection | None:
    """Share one target's verdict; the early return of its ejection, if a pass caused one
    (the detector publishes it)."""
    name, down = info.name, state.status == DOWN
    if len(enabled_targets(info)) > 1 and (down or before.status != UP):
        await detector.mark_down(name, key, down)
    if down:
        return None
    view = detector.cached(name) or await detector.outliers(name)
    if key not in view.ejected:
        return None
    return await detector.return_early(name, key)


async def ejection_ends(
    detector: OutlierDetector,
    modules: dict[str, ModuleInfo],
    seen: dict[str, dict[str, float]],
    now: float,
) -> None:
    """Publish the ejections of ``seen`` (per module: target → end, as last read) that the
    views no longer show, then remember the views' ejections in ``seen``."""
    for name, info in modules.items():
        if len(enabled_targets(info)) < 2:
            continue
        try:
            view = await detector.outliers(name)
        except Exception:
            log.exception("could not read the outlier view", extra={"gw_module": name})
            continue
        for key, until in seen.get(name, {}).items():
            if key not in view.ejected:
                reason, at = (EXPIRED, until) if until <= now else (ACTIVE_PROBE, now)
                count = view.ejections.get(key, 0)
                events.target_ejected(Ejection(name, key, False, at, count, reason, at))
        seen[name] = dict(view.ejected)


__all__ = ["ejection_ends", "enabled_targets", "pool_error", "share"]
