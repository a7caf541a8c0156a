"""Passive outlier ejection of a module's targets (SPEC §18), shared by every process.

Envoy's ``outlier_detection`` with ``consecutive_gateway_failure`` semantics, decided in the
state store (``gateway.state.base.OutlierStore``: memory per process, or one Lua script in
Redis per result, so every process and host agrees):

- a gateway failure (connect error, timeout, 502/503/504: :func:`is_gateway_failure`) counts;
  a success resets the count; after ``consecutive_failures`` in a row the target is ejected
  for ``base_ejection × count`` (its ejection count, this one included) capped at
  ``max_ejection``, times ``1 + jitter × U[0, 1)`` (jitter 0.1: +0–10 %, drawn from the
  injected RNG) so replicas ejected together do not all return at the same instant;
- at most ``max_ejection_percent`` of the pool is ejected at once, but one target may always
  be (Envoy's rule); a refused ejection is retried by the target's next failure (Envoy only
  tries at the exact threshold and then waits for a success to reset the count: a target
  that keeps failing while the cap is full would never be ejected once room frees);
- results of a target while it is ejected change nothing (Envoy ignores them too);
- the count decays: one less per ``base_ejection`` seconds the target stays un-ejected;
- a passing active probe returns an ejected target early (:meth:`OutlierDetector.return_early`);
- the health worker's verdict (:meth:`OutlierDetector.mark_down`) travels in the same view
  (``Outliers.down``): a target whose probe failed is not chosen until a probe passes.

**No store call on a healthy request.** Only failures are sent to the store, plus the first
success after a failure this process reported or that the shared view shows (the cached
:class:`Outliers` lists targets with consecutive failures, as read ≤ ``refresh`` seconds
ago): a success of a target nobody saw fail costs nothing. The view (ejected targets with
their end times) is read once per ``refresh`` seconds per module and process; an ejection
decided in this process applies to its view at once.

Every ejection that begins is returned by the call that caused it (exactly once across all
processes: the store decides atomically); ends are seen when a view is refreshed (in every
process) or returned by :meth:`OutlierDetector.return_early`. Each event also goes to
``on_event`` (metrics, span events, ``target.ejected`` live events: wired by the caller).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from gateway.core.clock import Clock
from gateway.core.conf import gw
from gateway.state.base import OutlierStore
from gateway.state.ejections import (
    ACTIVE_PROBE,
    EXPIRED,
    NO_OUTLIERS,
    Ejection,
    OutlierConfig,
    Outliers,
)
from gateway.state.guard import Guarded
from gateway.state.memory import MemoryOutlierStore

logger = logging.getLogger(__name__)

#: The upstream statuses that count as a target's failure (with connect errors and timeouts).
GATEWAY_FAILURES = frozenset({502, 503, 504})


def is_gateway_failure(status: int | None, error: bool) -> bool:
    """A connect error or timeout (``error``), or a 502/503/504 from the target."""
    return error or status in GATEWAY_FAILURES


def outlier_config() -> OutlierConfig:
    """The ``VX11_OUTLIER_*`` knobs."""
    return OutlierConfig(
        consecutive_failures=gw.outlier_consecutive_failures,
        base_ejection=gw.outlier_base_ejection_seconds,
        max_ejection=gw.outlier_max_ejection_seconds,
        max_ejection_percent=float(gw.outlier_max_ejection_percent),
    )


class FallbackOutlierStore(Guarded[OutlierStore]):
    """The shared store first, per-process memory while it is slow or down (the one store
    guard, as ``FallbackBreakerBackend``): an outage degrades sharing, never a request."""

    def __init__(
        self,
        primary: OutlierStore,
        fallback: MemoryOutlierStore,
        timeout: float = 0.05,
        retry_interval: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            primary,
            fallback,
            label="outlier store",
            log=logger,
            timeout=timeout,
            retry_interval=retry_interval,
            clock=clock,
        )

    async def record(
        self,
        module: str,
        target: str,
        now: float,
        cfg: OutlierConfig,
        *,
        failure: bool,
        n_targets: int,
        stretch: float,
    ) -> Ejection | None:
        return await self._call(
            lambda s: s.record(
                module, target, now, cfg, failure=failure, n_targets=n_targets, stretch=stretch
            )
        )

    async def return_early(
        self, module: str, target: str, now: float, cfg: OutlierConfig
    ) -> Ejection | None:
        return await self._call(lambda s: s.return_early(module, target, now, cfg))

    async def outliers(self, module: str, now: float, cfg: OutlierConfig) -> Outliers:
        return await self._call(lambda s: s.outliers(module, now, cfg))

    async def mark_down(self, module: str, target: str, down: bool, cfg: OutlierConfig) -> bool:
        return await self._call(lambda s: s.mark_down(module, target, down, cfg))


class OutlierDetector:
    """One process's front to the outlier store: what to report, and a cached view."""

    __slots__ = ("_reported", "_views", "cfg", "clock", "on_event", "refresh", "rng", "store")

    def __init__(
        self,
        store: OutlierStore,
        cfg: OutlierConfig | None = None,
        *,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        refresh: float = 1.0,
        on_event: Callable[[Ejection], None] | None = None,
    ) -> None:
        """``clock``: wall-clock seconds (the state is shared by hosts); ``refresh``: how
        old a cached view may be (SPEC §18: an ejection is seen everywhere within 1 s)."""
        self.store = store
        self.cfg = cfg or outlier_config()
        self.clock = clock
        self.rng = rng or random.Random()
        self.refresh = refresh
        self.on_event = on_event
        self._views: dict[str, tuple[float, Outliers]] = {}
        #: Per module, the targets this process reported a failure for since their success.
        self._reported: dict[str, set[str]] = {}

    def _emit(self, event: Ejection | None) -> Ejection | None:
        if event is not None and self.on_event is not None:
            self.on_event(event)
        return event

    def suspect(self, module: str, target: str) -> bool:
        """Must a success of ``target`` be reported (someone saw it fail)?"""
        reported = self._reported.get(module)
        if reported is not None and target in reported:
            return True
        view = self._views.get(module)
        return view is not None and target in view[1].failing

    async def record(
        self, module: str, target: str, *, failure: bool, n_targets: int
    ) -> Ejection | None:
        """One attempt's result on ``target`` of a pool of ``n_targets`` enabled targets.

        A success of a target nobody saw fail returns at once, without a store call."""
        if not failure:
            if not self.suspect(module, target):
                return None
            self._reported.get(module, set()).discard(target)
            view = self._views.get(module)
            if view is not None:
                view[1].failing.pop(target, None)
        else:
            self._reported.setdefault(module, set()).add(target)
        stretch = 1.0 + self.cfg.jitter * self.rng.random()
        event = await self.store.record(
            module,
            target,
            self.clock(),
            self.cfg,
            failure=failure,
            n_targets=n_targets,
            stretch=stretch,
        )
        if event is not None:
            self._reported[module].discard(target)
            view = self._views.get(module)
            if view is not None:  # this process stops choosing it at once
                view[1].ejected[target] = event.until
                view[1].failing.pop(target, None)
        return self._emit(event)

    async def return_early(self, module: str, target: str) -> Ejection | None:
        """A passing active probe of ``target``: its ejection (if any) ends now."""
        event = await self.store.return_early(module, target, self.clock(), self.cfg)
        view = self._views.get(module)
        if event is not None and view is not None:
            view[1].ejected.pop(target, None)
        return self._emit(event)

    async def mark_down(self, module: str, target: str, down: bool) -> bool:
        """The health worker's verdict on ``target`` (``Outliers.down`` in every view that
        is read after it; this process's view at once). Returns whether it changed."""
        changed = await self.store.mark_down(module, target, down, self.cfg)
        view = self._views.get(module)
        if view is not None:
            (view[1].down.add if down else view[1].down.discard)(target)
        return changed

    def cached(self, module: str) -> Outliers | None:
        """The module's view if read less than ``refresh`` seconds ago (no await)."""
        view = self._views.get(module)
        if view is None or self.clock() - view[0] >= self.refresh:
            return None
        return view[1]

    async def outliers(self, module: str) -> Outliers:
        """The module's view: the cached one while fresh, else read from the store."""
        seen = self.cached(module)
        return seen if seen is not None else await self.reload(module)

    async def reload(self, module: str) -> Outliers:
        """Read the module's view now; ejections that ended since the last view are events."""
        now = self.clock()
        seen = await self.store.outliers(module, now, self.cfg)
        before = self._views.get(module)
        self._views[module] = (now, seen)
        if before is not None:
            for target, until in before[1].ejected.items():
                if target not in seen.ejected:
                    reason, at = (EXPIRED, until) if until <= now else (ACTIVE_PROBE, now)
                    count = seen.ejections.get(target, 0)
                    self._emit(Ejection(module, target, False, at, count, reason, at))
        return seen

    def forget(self, module: str) -> None:
        """Drop the module's cached view and reports (its targets changed, tests)."""
        self._views.pop(module, None)
        self._reported.pop(module, None)


__all__ = [
    "GATEWAY_FAILURES",
    "NO_OUTLIERS",
    "FallbackOutlierStore",
    "OutlierDetector",
    "is_gateway_failure",
    "outlier_config",
]
