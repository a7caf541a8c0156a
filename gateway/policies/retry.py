"""Retries that cannot multiply an outage: a bounded schedule, one deadline, a budget.

- Only idempotent methods are retried; a POST only with an ``Idempotency-Key`` on a route that
  allows it, because replaying a non-idempotent call can do the work twice.
- The schedule is 0.1 s, 0.5 s, 2.5 s (``0.1 * 5 ** (n - 1)``) with **±20 % uniform jitter**, so
  the mean stays on the SPEC's numbers while clients that failed together spread out. (Equal
  jitter would halve the mean; full jitter would make the first retry anything from 0 to 0.1 s.)
- An upstream ``Retry-After`` wins when it asks for longer. Every attempt must start before the
  one overall deadline, so retries never stretch a route's timeout.
- ``RetryBudget`` caps retries in flight at ``max(min_retries, ratio * recent requests)`` per
  module, per process, as Envoy's retry budget does (``budget_percent``,
  ``min_retry_concurrency``): when a module is down, retries stay a fraction of the traffic
  instead of multiplying it, and a quiet gateway can always have ``min_retries`` in flight.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import time
from collections import deque
from datetime import UTC

from gateway.core.clock import Clock

RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})
BACKOFF_BASE = 0.1
BACKOFF_FACTOR = 5.0
JITTER = 0.2

_DELTA_SECONDS = re.compile(r"\d+(\.\d+)?")


def may_retry_request(method: str, *, idempotency_key: bool, route_allows_post_retry: bool) -> bool:
    """True when the request may be sent again at all (the answer decides the rest)."""
    method = method.upper()
    if method in RETRY_METHODS:
        return True
    return method == "POST" and idempotency_key and route_allows_post_retry


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): ``0.1 * 5**(n-1)`` ±20 %."""
    if attempt < 1:
        raise ValueError("attempt counts retries from 1")
    base = BACKOFF_BASE * BACKOFF_FACTOR ** (attempt - 1)
    return base * (rng or random).uniform(1.0 - JITTER, 1.0 + JITTER)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or HTTP-date), or None.

    ``now`` is wall-clock epoch seconds (an HTTP-date is absolute). A date in the past
    means "now" (0.0); anything unparseable is ignored rather than trusted.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with unknown origin zone
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def next_delay(
    attempt: int,
    retry_after_header: str | None,
    deadline: float | None,
    now: float,
    rng: random.Random | None = None,
    *,
    wall_now: float | None = None,
) -> float | None:
    """The wait before retry ``attempt``, or None when that retry could not start in time.

    ``deadline`` and ``now`` share one clock (usually monotonic); ``wall_now`` is the
    wall-clock time used to read an HTTP-date ``Retry-After`` (defaults to ``now``).
    """
    delay = backoff_delay(attempt, rng)
    asked = parse_retry_after(retry_after_header, now if wall_now is None else wall_now)
    if asked is not None:
        delay = max(delay, asked)
    if deadline is not None and now + delay >= deadline:
        return None
    return delay


class RetryBudget:
    """Per-module cap on retries, relative to recent requests (per process).

    A retry is granted when fewer than ``min_retries`` retries are in flight (the
    floor, Envoy's ``min_retry_concurrency``: a quiet gateway can always retry, however
    many retries it made a moment ago), or else when both retries in flight and retries
    started within the window stay within ``ratio × requests in the window``. The
    window cap is what keeps a busy outage from being multiplied: above the floor,
    upstream sees at most ``1 + ratio`` attempts per request. Retries granted by the
    floor count as started too, so they use up the ratio's share first.

    Requests are counted in ``BUCKETS`` time buckets over ``window`` seconds, so memory
    stays constant however busy a module is. Not thread-safe: one event loop owns it.
    """

    BUCKETS = 10

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries: int = 3,
        window: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.ratio = ratio
        self.min_retries = min_retries
        self.window = window
        self.clock = clock
        self._width = window / self.BUCKETS
        self._requests: dict[str, deque[list[int]]] = {}  # module -> [[bucket, count], ...]
        self._retries: dict[str, deque[list[int]]] = {}
        self._inflight: dict[str, int] = {}

    def _recent(
        self, module: str, now: float, table: dict[str, deque[list[int]]] | None = None
    ) -> deque[list[int]]:
        table = self._requests if table is None else table
        buckets = table.get(module)
        if buckets is None:
            buckets = table[module] = deque()
        oldest = math.floor(now / self._width) - self.BUCKETS
        while buckets and buckets[0][0] <= oldest:
            buckets.popleft()
        return buckets

    def note_request(self, module: str) -> None:
        """Count one original (non-retry) request towards the module's budget."""
        self._count(module, self._requests)

    def _count(self, module: str, table: dict[str, deque[list[int]]]) -> None:
        now = self.clock()
        buckets = self._recent(module, now, table)
        bucket = math.floor(now / self._width)
        if buckets and buckets[-1][0] == bucket:
            buckets[-1][1] += 1
        else:
            buckets.append([bucket, 1])

    def limit(self, module: str) -> float:
        """Retries the module may have in flight right now."""
        recent = sum(count for _, count in self._recent(module, self.clock()))
        return max(float(self.min_retries), self.ratio * recent)

    def try_acquire_retry(self, module: str) -> bool:
        """Take a retry slot; pair every True with ``release_retry`` when the retry ends."""
        inflight = self._inflight.get(module, 0)
        if inflight >= self.min_retries:
            now = self.clock()
            limit = self.ratio * sum(count for _, count in self._recent(module, now))
            # Granted only if the budget still holds once this retry counts: 20 % of 99
            # requests is 19 retries, not 20 (a fractional limit never rounds up).
            if inflight + 1 > limit:
                return False
            started = sum(count for _, count in self._recent(module, now, self._retries))
            if started + 1 > limit:
                return False
        self._inflight[module] = inflight + 1
        self._count(module, self._retries)
        return True

    def release_retry(self, module: str) -> None:
        inflight = self._inflight.get(module, 0)
        if inflight <= 1:
            self._inflight.pop(module, None)
        else:
            self._inflight[module] = inflight - 1

    def inflight(self, module: str) -> int:
        return self._inflight.get(module, 0)


__all__ = [
    "RETRY_METHODS",
    "RETRY_STATUSES",
    "RetryBudget",
    "backoff_delay",
    "may_retry_request",
    "next_delay",
    "parse_retry_after",
]
