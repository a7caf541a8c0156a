"""Outlier ejection's values and arithmetic, shared by the memory and Redis stores.

Written once here (as ``gateway.state.values`` does for the breaker) so both stores decide
alike; the Redis script (``lua/outlier_record.lua``) repeats the same formulas in the same
order of floating-point operations, so the two stores agree to the last bit (a contract
suite runs the same cases on both).

Per target the store keeps: ``consecutive`` gateway failures, the ejection ``count``, the
end of the current ejection (``until``) and ``since``: when the target's current healthy
period began (the end of its last ejection). The count decays lazily: it loses one for each
``base_ejection`` seconds elapsed since ``since`` (Envoy decrements its ejection multiplier
while a host stays un-ejected), computed whenever the state is read or written, so no timer
runs anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Why an ejection began or ended (``Ejection.reason``).
CONSECUTIVE_FAILURES = "consecutive_failures"
ACTIVE_PROBE = "active_probe"
EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """The SPEC §18 knobs (``VX11_OUTLIER_*``); ``jitter``: the largest fraction added to an
    ejection's duration (0.1: +0–10 %), so replicas ejected together do not return together."""

    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejection_percent: float = 50.0
    jitter: float = 0.1

    @property
    def max_count(self) -> int:
        """The count past which the duration no longer grows (Envoy stops increasing its
        multiplier there too): counts are kept at most this high, so they decay in time."""
        return max(1, math.ceil(self.max_ejection / self.base_ejection))

    def duration(self, count: int, stretch: float) -> float:
        """``base × count`` capped at ``max``, times ``stretch`` (1 + jitter × U[0, 1))."""
        return min(self.base_ejection * count, self.max_ejection) * stretch

    def allows(self, ejected_now: int, n_targets: int) -> bool:
        """May one more target of a pool of ``n_targets`` be ejected (Envoy's rule: the
        percentage *after* this ejection within the cap, or none ejected yet)?"""
        return ejected_now == 0 or 100.0 * (ejected_now + 1) <= self.max_ejection_percent * (
            n_targets
        )

    @property
    def ttl(self) -> int:
        """Seconds a module's state outlives its last write: past the longest ejection and
        the full decay of the largest count, so nothing is forgotten early or kept forever."""
        longest = self.max_ejection * (1 + self.jitter)
        return math.ceil(longest + self.max_count * self.base_ejection) + 60


def decayed(count: int, since: float, now: float, base: float) -> tuple[int, float]:
    """``count`` less one per ``base`` seconds since ``since``, and the new ``since``."""
    if count <= 0 or now <= since:
        return count, since
    steps = math.floor((now - since) / base)
    if steps <= 0:
        return count, since
    if steps >= count:
        return 0, since
    return count - steps, since + steps * base


@dataclass(frozen=True, slots=True)
class Ejection:
    """An ejection that began (``ejected``) or ended; what metrics, span events and the
    ``target.ejected`` live event report. ``until``: when it ends (for an end: when it did)."""

    module: str
    target: str
    ejected: bool
    until: float
    count: int
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Outliers:
    """One module's outlier state as read at ``now``: targets ejected (until when), targets
    with consecutive failures and not ejected, the (decayed) ejection counts, and the
    targets the health worker's last probe found ``down`` (SPEC §18 active health: not
    chosen until a probe passes; written by ``OutlierStore.mark_down``).

    The request path's choice reads ``down`` from the same cached view as ``ejected`` (no
    extra store call): ``Pool.set_healthy(key, key not in view.down)`` for each target."""

    ejected: dict[str, float] = field(default_factory=dict)
    failing: dict[str, int] = field(default_factory=dict)
    ejections: dict[str, int] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)


NO_OUTLIERS = Outliers()

__all__ = [
    "ACTIVE_PROBE",
    "CONSECUTIVE_FAILURES",
    "EXPIRED",
    "NO_OUTLIERS",
    "Ejection",
    "OutlierConfig",
    "Outliers",
    "decayed",
]
