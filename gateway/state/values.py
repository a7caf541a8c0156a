"""What the state store decides, as values: rate-limit scopes and decisions, breaker
settings, permits, transitions and statuses.

They sit in the state layer because every store implementation (``gateway.state.memory``,
``gateway.state.redis_store``) answers in them; the policies (``gateway.policies``) re-export
them under their historical names.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

# --------------------------------------------------------------------------- rate limit


class Scope(NamedTuple):
    """One limit that applies to a request (``name`` is what the 429 reports)."""

    name: str  # "token" | "ip" | "protected"
    key: str  # e.g. "token:<client-id>", "ip:1.2.3.4", "protected:<client-id>"
    limit: int
    window: int  # seconds


class ScopeResult(NamedTuple):
    """Usage of one scope after a decision.

    ``remaining``: requests this scope would still admit now (after this request
    was counted, if it was admitted; 0 when full).

    ``reset``: seconds until ``remaining`` next goes up, i.e. until the window
    frees a slot: the time the oldest counted request leaves the window (when the
    scope is over its limit, e.g. after the limit was lowered, the entry whose
    departure brings the count below the limit). 0 when nothing is counted. For
    a full scope it is exactly how long a new request has to wait.
    """

    scope: Scope
    remaining: int
    reset: float


class Decision(NamedTuple):
    """The answer for one request over all its scopes.

    ``would_refuse`` is the limiter's verdict whatever the enforcement: True
    whenever the limits refuse the request, also in shadow mode where ``allowed``
    stays True, so callers can count "would have been limited" in one place.
    """

    allowed: bool
    results: tuple[ScopeResult, ...]
    refused_by: Scope | None  # the first refusing scope, in the order given
    retry_after: float  # seconds; 0 when allowed
    degraded: bool = False  # answered without the shared store
    would_refuse: bool = False

    def most_restrictive(self) -> ScopeResult:
        """The scope the headers report: the refusing one, else the least remaining.

        Ties on ``remaining`` go to the longest ``reset`` because that is the
        scope the client will wait on longest.
        """
        if not self.results:
            raise ValueError("a decision without scopes has no most restrictive scope")
        if self.refused_by is not None:
            for result in self.results:
                if result.scope == self.refused_by:
                    return result
        return min(self.results, key=lambda r: (r.remaining, -r.reset))


def decide(
    scopes: Sequence[Scope], counts: Sequence[int], resets: Sequence[float], admits: Sequence[bool]
) -> Decision:
    """Build a Decision from per-scope counts; shared so every store answers alike."""
    results = tuple(
        ScopeResult(scope=s, remaining=max(s.limit - c, 0), reset=r)
        for s, c, r in zip(scopes, counts, resets, strict=True)
    )
    refused = [res for res, ok in zip(results, admits, strict=True) if not ok]
    if not refused:
        return Decision(allowed=True, results=results, refused_by=None, retry_after=0.0)
    return Decision(
        allowed=False,
        results=results,
        refused_by=refused[0].scope,
        # Every refusing scope must free a slot before a retry can pass.
        retry_after=max(res.reset for res in refused),
        would_refuse=True,
    )


def window_reset(
    entries: Sequence[float] | deque[float], limit: int, window: int, now: float
) -> float:
    """Seconds until the entry whose expiry raises ``remaining`` leaves the window."""
    count = len(entries)
    if count == 0:
        return 0.0
    k = max(count - limit + 1, 1)  # 1-based index of the entry that frees a slot
    return max(entries[k - 1] + window - now, 0.0)


# --------------------------------------------------------------------------- breaker

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
FORCE_ACTIONS = frozenset({"reset", "force_open", "force_closed", "auto"})
#: A caller refused for want of a probe slot may try again this soon (the probe is likely
#: to finish quickly), or sooner if the earliest lease expires first.
PROBE_RETRY_AFTER = 1.0
#: The failure-rate window is kept as this many buckets (a sliding window at 1/10 grain).
WINDOW_BUCKETS = 10


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 3
    recovery_timeout: float = 60.0
    half_open_max_calls: int = 1
    success_threshold: int = 1
    failure_statuses: frozenset[int] = frozenset({500, 502, 503, 504})
    window_seconds: float | None = None
    failure_rate_threshold: float | None = None
    min_calls: int = 10
    probe_lease_seconds: float = 30.0

    @property
    def uses_window(self) -> bool:
        return bool(self.window_seconds) and self.failure_rate_threshold is not None


@dataclass(frozen=True)
class Permit:
    allowed: bool
    state: str
    retry_after: float
    probe_id: str | None = None
    #: Closed, not forced, no failure counted: a success would change nothing, so the
    #: facade skips recording it (one store round trip less per healthy request).
    clean: bool = False


#: The two closed permits (shared: permits are immutable).
ALLOW_CLOSED = Permit(True, CLOSED, 0.0, None)
CLEAN_CLOSED = Permit(True, CLOSED, 0.0, None, clean=True)


@dataclass(frozen=True)
class Transition:
    module: str
    from_state: str
    to_state: str
    reason: str
    at: float


@dataclass(frozen=True)
class BreakerStatus:
    state: str
    failure_count: int
    last_failure: float | None
    opened_at: float | None
    retry_after: float
    forced: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The SPEC §6 status shape (``forced`` is admin-only detail, left out)."""
        return {
            "state": self.state,
            "failure_count": self.failure_count,
            "last_failure": self.last_failure,
            "opened_at": self.opened_at,
            "retry_after": self.retry_after,
        }


def check_action(action: str) -> None:
    if action not in FORCE_ACTIONS:
        raise ValueError(f"unknown breaker action {action!r}; use one of {sorted(FORCE_ACTIONS)}")


def probe_wait(earliest_expiry: float, now: float) -> float:
    return max(0.0, min(PROBE_RETRY_AFTER, earliest_expiry - now))


def report(
    state: str,
    failures: int,
    last_failure: float | None,
    opened_at: float | None,
    forced: str | None,
    cfg: BreakerConfig,
    now: float,
) -> BreakerStatus:
    """The state as seen at ``now``: an open breaker past its timeout reads half-open."""
    if forced == OPEN:
        return BreakerStatus(OPEN, failures, last_failure, opened_at, cfg.recovery_timeout, forced)
    if forced == CLOSED:
        return BreakerStatus(CLOSED, failures, last_failure, opened_at, 0.0, forced)
    retry_after = 0.0
    if state == OPEN:
        remaining = (opened_at or 0.0) + cfg.recovery_timeout - now
        if remaining > 0:
            retry_after = remaining
        else:
            state = HALF_OPEN
    return BreakerStatus(state, failures, last_failure, opened_at, retry_after, None)
