"""When to probe each module: the health schedule (plain Python, injected ``rng``).

Per module::

    healthy ──probe fails──► incident ──down_after consecutive failures──► down
       ▲                       │  every incident_interval (1 s)            │ backoff: 2 s, 4 s,
       │                       └──probe passes──┐                          │ 8 s … max_backoff
       │                                        ▼                          │
       └──confirm_after consecutive passes── recovering ◄──probe passes────┘
         (every interval, 5 s)                 every incident_interval (1 s)

A module "stays down" once ``down_after`` (3) probes in a row have failed: from then on the
delay doubles from the incident interval (2 s after the 3rd failure, 4 s after the 4th …)
up to ``VX11_HEALTH_MAX_BACKOFF``. Every delay is jittered ±10 % (never above the maximum),
so many modules — or many hosts' checkers after a failover — do not probe in lock-step.

Each **target** of a module (SPEC §18) runs this schedule on its own; the module's status is
:func:`pool_state` of its targets': ``up``, ``degraded`` (some targets down) or ``down``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.conf import gw

UP, DOWN, UNKNOWN = "up", "down", "unknown"
#: A module some of whose targets are up and some down (SPEC §18); it still serves.
DEGRADED = "degraded"


@dataclass(frozen=True)
class ModuleState:
    """What the schedule needs to know about one module's recent probes."""

    status: str = UNKNOWN
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    #: True from the first failure until ``confirm_after`` passes in a row.
    incident: bool = False


@dataclass(frozen=True)
class HealthSchedule:
    interval: float = 5.0
    incident_interval: float = 1.0
    max_backoff: float = 60.0
    down_after: int = 3
    confirm_after: int = 2
    jitter: float = 0.1

    def after(self, state: ModuleState, ok: bool) -> ModuleState:
        """The state once a probe passed (``ok``) or failed."""
        if ok:
            successes = state.consecutive_successes + 1
            incident = state.incident and successes < self.confirm_after
            return ModuleState(UP, 0, successes, incident)
        return ModuleState(DOWN, state.consecutive_failures + 1, 0, True)

    def phase(self, state: ModuleState) -> str:
        if state.consecutive_failures >= self.down_after:
            return "down"
        if state.consecutive_failures:
            return "incident"
        if state.incident:
            return "recovering"
        return "healthy"

    def base_delay(self, state: ModuleState) -> float:
        """Seconds until the next probe, before jitter."""
        phase = self.phase(state)
        if phase == "down":
            doublings = state.consecutive_failures - self.down_after + 1
            # Capped exponent: a module down for days must not overflow the float.
            return min(self.max_backoff, self.incident_interval * 2.0 ** min(doublings, 60))
        if phase in ("incident", "recovering"):
            return self.incident_interval
        return self.interval

    def next_delay(self, state: ModuleState, rng: Callable[[], float] = random.random) -> float:
        """The jittered delay: ``base × (1 ± jitter)``, never above ``max_backoff``."""
        base = self.base_delay(state)
        jittered = base * (1.0 + self.jitter * (2.0 * rng() - 1.0))
        return max(0.0, min(jittered, max(self.max_backoff, base)))

    @classmethod
    def from_settings(cls) -> HealthSchedule:
        return cls(
            interval=gw.health_interval,
            incident_interval=gw.health_incident_interval,
            max_backoff=gw.health_max_backoff,
        )


def pool_state(targets: list[ModuleState]) -> ModuleState:
    """A module's state from its enabled targets' (each on its own schedule, per target):
    ``up`` when every probed target is up, ``down`` when none is, else ``degraded``.

    A module of one target has that target's state. Down, its failures are the fewest of
    its targets' (the module stays down as long as its most recently failing one); up,
    its passes are the fewest of its targets'; in an incident while any target is."""
    known = [t for t in targets if t.status != UNKNOWN]
    if not known:
        return ModuleState()
    up = [t for t in known if t.status == UP]
    incident = any(t.incident for t in known)
    if len(up) == len(known):
        return ModuleState(UP, 0, min(t.consecutive_successes for t in up), incident)
    if not up:
        return ModuleState(DOWN, min(t.consecutive_failures for t in known), 0, True)
    return ModuleState(DEGRADED, 0, 0, True)


__all__ = ["DEGRADED", "DOWN", "UNKNOWN", "UP", "HealthSchedule", "ModuleState", "pool_state"]
