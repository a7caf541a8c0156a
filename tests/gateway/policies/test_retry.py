"""Retry policy: which requests, how long to wait, when to stop, how many at once."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from gateway.policies.retry import (
    RETRY_STATUSES,
    RetryBudget,
    backoff_delay,
    may_retry_request,
    next_delay,
    parse_retry_after,
)
from tests.conftest import FakeClock

NOW = 1_700_000_000.0


# --------------------------------------------------------------------------- which requests


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "get"])
def test_idempotent_methods_may_be_retried(method: str) -> None:
    assert may_retry_request(method, idempotency_key=False, route_allows_post_retry=False)


@pytest.mark.parametrize(
    ("key", "route_allows", "expected"),
    [(False, False, False), (True, False, False), (False, True, False), (True, True, True)],
)
def test_a_post_needs_a_key_and_the_route(key: bool, route_allows: bool, expected: bool) -> None:
    assert (
        may_retry_request("POST", idempotency_key=key, route_allows_post_retry=route_allows)
        is expected
    )


def test_patch_is_never_retried() -> None:
    assert not may_retry_request("PATCH", idempotency_key=True, route_allows_post_retry=True)


def test_only_gateway_errors_are_retry_statuses() -> None:
    assert {502, 503, 504} == RETRY_STATUSES


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(("attempt", "base"), [(1, 0.1), (2, 0.5), (3, 2.5)])
def test_backoff_follows_the_schedule_within_twenty_percent(attempt: int, base: float) -> None:
    rng = random.Random(7)
    delays = [backoff_delay(attempt, rng) for _ in range(2000)]
    assert min(delays) >= base * 0.8
    assert max(delays) <= base * 1.2
    assert sum(delays) / len(delays) == pytest.approx(base, rel=0.02)
    assert max(delays) - min(delays) > base * 0.3  # it really is jittered


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    first = [backoff_delay(n, random.Random(42)) for n in (1, 2, 3)]
    assert first == [backoff_delay(n, random.Random(42)) for n in (1, 2, 3)]


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0)


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), (" 120 ", 120.0), ("0", 0.0), ("1.5", 1.5), (None, None), ("", None),
     ("soon", None), ("-5", None), ("3 seconds", None)],
)  # fmt: skip
def test_retry_after_delta_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_http_date() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True)
    assert parse_retry_after(when, NOW) == pytest.approx(30.0)


def test_retry_after_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0.0


# --------------------------------------------------------------------------- next delay


def test_next_delay_is_the_backoff_without_retry_after() -> None:
    delay = next_delay(2, None, deadline=100.0, now=0.0, rng=random.Random(1))
    assert delay == backoff_delay(2, random.Random(1))


def test_a_longer_retry_after_wins() -> None:
    assert next_delay(1, "2", deadline=100.0, now=0.0, rng=random.Random(1)) == 2.0


def test_a_shorter_retry_after_does_not_shorten_the_backoff() -> None:
    delay = next_delay(3, "0", deadline=100.0, now=0.0, rng=random.Random(1))
    assert delay == backoff_delay(3, random.Random(1))


def test_no_retry_when_it_could_not_start_before_the_deadline() -> None:
    assert next_delay(3, None, deadline=10.0 + 1.9, now=10.0, rng=random.Random(1)) is None
    assert next_delay(3, None, deadline=10.0 + 3.1, now=10.0, rng=random.Random(1)) is not None
    assert next_delay(1, "5", deadline=14.0, now=10.0, rng=random.Random(1)) is None


def test_http_date_retry_after_uses_the_wall_clock() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 4, UTC), usegmt=True)
    delay = next_delay(1, when, deadline=105.0, now=100.0, rng=random.Random(1), wall_now=NOW)
    assert delay == pytest.approx(4.0)


def test_no_deadline_means_no_cut_off() -> None:
    assert next_delay(1, "3600", deadline=None, now=0.0) == 3600.0


# --------------------------------------------------------------------------- budget


def test_budget_denies_the_fourth_concurrent_retry_with_little_traffic() -> None:
    clock = FakeClock()
    budget = RetryBudget(clock=clock)
    for _ in range(5):
        budget.note_request("madre")
    assert [budget.try_acquire_retry("madre") for _ in range(4)] == [True, True, True, False]
    budget.release_retry("madre")
    # The floor is three retries *in flight*: one ended, so one more may start.
    assert budget.try_acquire_retry("madre")
    assert not budget.try_acquire_retry("madre")


def test_a_quiet_gateway_can_always_retry_after_earlier_retries() -> None:
    """SPEC §7: the minimum is 3 retries in flight at once (Envoy's min_retry_concurrency),
    not 3 per window: a module retried a few times a moment ago is still retried now."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_retries=3, window=10.0, clock=clock)
    granted = []
    for _ in range(10):  # one request a second, each retried once, one at a time
        budget.note_request("madre")
        granted.append(budget.try_acquire_retry("madre"))
        budget.release_retry("madre")
        clock.advance(1.0)
    assert granted == [True] * 10
    clock.advance(60.0)  # a minute later, still quiet
    budget.note_request("madre")
    assert budget.try_acquire_retry("madre")


def test_the_floor_is_not_blocked_by_the_window_cap() -> None:
    """Retries started in the window are far past 20 % of requests; the floor still holds."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_retries=3, window=10.0, clock=clock)
    budget.note_request("madre")
    for _ in range(30):
        assert budget.try_acquire_retry("madre")
        budget.release_retry("madre")
    held = [budget.try_acquire_retry("madre") for _ in range(4)]
    assert held == [True, True, True, False]  # three at once, never a fourth


def test_budget_grows_with_traffic() -> None:
    budget = RetryBudget(clock=FakeClock())
    for _ in range(100):
        budget.note_request("madre")
    granted = sum(budget.try_acquire_retry("madre") for _ in range(50))
    assert granted == 20  # 20 % of 100


def test_budget_is_per_module() -> None:
    budget = RetryBudget(clock=FakeClock())
    for _ in range(3):
        assert budget.try_acquire_retry("madre")
    assert not budget.try_acquire_retry("madre")
    assert budget.try_acquire_retry("shub")


def test_budget_forgets_requests_outside_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(window=10.0, clock=clock)
    for _ in range(100):
        budget.note_request("madre")
    clock.advance(5)
    assert budget.limit("madre") == pytest.approx(20.0)
    clock.advance(6)
    assert budget.limit("madre") == 3.0
    assert sum(budget.try_acquire_retry("madre") for _ in range(10)) == 3


def test_releasing_more_than_acquired_does_not_go_negative() -> None:
    budget = RetryBudget(clock=FakeClock())
    budget.release_retry("madre")
    assert budget.inflight("madre") == 0
    assert sum(budget.try_acquire_retry("madre") for _ in range(5)) == 3


def test_budget_caps_retries_started_in_the_window_not_only_in_flight() -> None:
    """Above the floor, sequential retries (each released at once) stop at 20 % of
    requests started in the window, the floor's own retries included."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_retries=3, window=10.0, clock=clock)
    for _ in range(100):
        budget.note_request("madre")
    assert all(budget.try_acquire_retry("madre") for _ in range(3))  # the floor, held
    granted = 3
    for _ in range(100):
        if budget.try_acquire_retry("madre"):
            granted += 1
            budget.release_retry("madre")
    assert granted == 20
    clock.advance(11)  # a new window: the old requests and retries are forgotten
    budget.release_retry("madre")
    assert budget.try_acquire_retry("madre")  # below the floor again
