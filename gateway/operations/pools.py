"""Module pools on the request path (SPEC §18): outlier ejection kept in step with the choice.

``gateway.operations.registry`` builds, per event loop, one :class:`PoolDetector` (``svc.outliers``)
over the outlier store — Redis behind the store guard when one is configured, else this
process's memory — and hands it the process-wide :class:`~gateway.policies.balancer.Balancer`
(``svc.balancer``). The detector is ``gateway.policies.outlier.OutlierDetector`` plus what
keeps the balancer's pools in step with it:

- :meth:`PoolDetector.keep_fresh`, called per attempt to a pool of several targets, makes
  sure a background task reloads the module's view every ``refresh`` (1 s) while the module
  is in use, so an ejection decided by any process or host reaches this pool within a
  second; the pool keeps choosing on the view it has meanwhile (no request waits on the
  store; a healthy request makes no store call at all);
- :meth:`PoolDetector.outcome`: one attempt's result; an ejection decided here applies to
  this process's pool at once;
- :meth:`PoolDetector.return_early`: a passing active probe (the health worker) returns an
  ejected target to the pool at once.

Ejections that begin are counted (``vx11_target_ejections_total``: once over all processes,
the store decides atomically) and published as ``target.ejected`` live events, as are ends
by an active probe (reported once, by the caller of ``return_early``); ends by expiry are
seen by every process's reload and are not published here (one place, the health worker,
may publish them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import redis.asyncio as aioredis

from gateway.core import metrics
from gateway.core.clock import Clock
from gateway.core.conf import gw
from gateway.operations import events
from gateway.policies.balancer import Balancer, Pool
from gateway.policies.outlier import FallbackOutlierStore, OutlierDetector
from gateway.state.base import OutlierStore
from gateway.state.ejections import ACTIVE_PROBE, Ejection
from gateway.state.memory import MemoryOutlierStore
from gateway.state.redis_outliers import RedisOutlierStore
from gateway.state.resp import ScriptRunner

log = logging.getLogger("gateway.pools")
#: A module's refresher stops after this many seconds without an attempt (restarted by the
#: next one, whose choice uses the view as it was).
IDLE_STOP = 60.0


def outlier_store(
    memory: MemoryOutlierStore,
    client: aioredis.Redis | ScriptRunner | None = None,
    *,
    timeout: float = 0.05,
) -> OutlierStore:
    """Where ejections are decided: with ``client``, Redis behind the one store guard (this
    process's ``memory`` while Redis is unreachable); without, ``memory``."""
    if client is None:
        return memory
    return FallbackOutlierStore(RedisOutlierStore(client), memory, timeout=timeout)


def on_ejection(event: Ejection) -> None:
    """The detector's ``on_event``: a metric and a live event for an ejection's start (and
    for an end by an active probe); an end by expiry is every process's to see, not to tell."""
    if event.ejected:
        metrics.target_ejected(event.module, event.target)
    elif event.reason != ACTIVE_PROBE:
        return
    events.target_ejected(event)


class PoolDetector(OutlierDetector):
    """The outlier detector of one event loop, keeping :attr:`balancer`'s pools in step."""

    __slots__ = ("_loading", "_used", "balancer", "generation")

    def __init__(
        self,
        store: OutlierStore,
        balancer: Balancer,
        *,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        refresh: float = 1.0,
    ) -> None:
        super().__init__(store, clock=clock, rng=rng, refresh=refresh, on_event=on_ejection)
        self.balancer = balancer
        self.generation = gw.generation  # a settings reload builds a new detector
        self._loading: dict[str, asyncio.Task[None]] = {}  # the running refreshers
        self._used: dict[str, float] = {}  # module → its last attempt (clock)

    def keep_fresh(self, module: str) -> float:
        """Per attempt to a pool of several targets: note the module as in use and make sure
        its refresher runs; never waits. Returns the detector's clock (the choice's now)."""
        now = self._used[module] = self.clock()
        if module not in self._loading:
            task = asyncio.get_running_loop().create_task(self._refresher(module))
            self._loading[module] = task
        return now

    async def _refresher(self, module: str) -> None:
        """Reload ``module``'s view every ``refresh`` seconds while it is in use (an attempt
        in the last :data:`IDLE_STOP` seconds) and the settings are this detector's: a busy
        process's view is never more than ``refresh`` old, however requests arrive."""
        try:
            while self.generation == gw.generation:
                await self._load(module)
                await asyncio.sleep(self.refresh)
                if self.clock() - self._used.get(module, 0.0) > IDLE_STOP:
                    break
        finally:
            self._loading.pop(module, None)

    async def _load(self, module: str) -> None:
        try:
            seen = await self.reload(module)
        except Exception:  # the store guard falls back; anything else: the next turn
            log.exception("could not read the outlier view", extra={"gw_module": module})
            return
        self._apply(module, seen.ejected, seen.down)

    def _apply(self, module: str, ejected: dict[str, float], down: set[str] | None = None) -> None:
        pool = self.balancer.pools().get(module)
        if pool is not None:
            pool.set_ejected(ejected)
            # The health worker's verdicts (SPEC §18 active health, ``Outliers.down``).
            for t in pool.targets:
                if t.healthy == (t.key in (down or ())):
                    pool.set_healthy(t.key, not t.healthy)

    async def outcome(self, pool: Pool, target: str, *, failure: bool) -> Ejection | None:
        """One attempt's result on ``target`` of ``pool``; an ejection it causes applies to
        ``pool`` at once (this process stops choosing the target now, the others within
        ``refresh``)."""
        event = await self.record(pool.module, target, failure=failure, n_targets=len(pool.enabled))
        if event is not None and event.ejected:
            view = self._views.get(pool.module)
            # Merged into what the pool shows (the Balancer is the whole process's: another
            # loop's ejections are in it too), never replacing it.
            ejected = {t.key: t.ejected_until for t in pool.targets if t.ejected_until}
            if view is not None:
                ejected.update(view[1].ejected)
            ejected[target] = event.until
            pool.set_ejected(ejected)
        return event

    async def return_early(self, module: str, target: str) -> Ejection | None:
        """A passing active probe of ``target``: its ejection ends now, in this process's
        pool too."""
        event = await super().return_early(module, target)
        pool = self.balancer.pools().get(module) if event is not None else None
        if pool is not None:
            pool.set_ejected(
                {
                    t.key: t.ejected_until
                    for t in pool.targets
                    if t.key != target and t.ejected_until
                }
            )
        return event

    async def aclose(self) -> None:
        """Cancel reloads still running (tests, shutdown)."""
        for task in list(self._loading.values()):
            task.cancel()
        self._loading.clear()


__all__ = ["PoolDetector", "on_ejection", "outlier_store"]
